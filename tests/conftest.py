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


#: how often the test cluster's processes export their metrics (milliseconds)
METRICS_INTERVAL_MS = 1000


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1 for the session, its endpoint and
    credentials in the environment (before Ray starts, so that Ray's workers inherit them)."""
    from tests.s3_server import S3Server

    server = S3Server()
    server.export_env()
    yield server.start()
    server.close()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """One local Ray for every end-to-end test (4 logical CPUs so trainers leave room for Data),
    started with the S3 server's variables in its environment. Its processes export their
    metrics every second (Ray's default is 10 s), so that a test reading them from Ray's
    Prometheus endpoint waits seconds, not tens of seconds."""
    import ray

    from oclear_ray.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_metrics_report_interval_ms", str(METRICS_INTERVAL_MS))
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
