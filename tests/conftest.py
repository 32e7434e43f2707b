"""Shared fixtures: a local Ray cluster for the session and small images made in the test."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image


def png_bytes(color=(200, 30, 30), size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(color=(30, 200, 30), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray for every end-to-end test (4 logical CPUs so trainers leave room for Data)."""
    import ray

    from oclear_ray.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
