"""Shared fixtures: a local Ray cluster for the session and small images made in the test."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.local_ray import TEST_RAY_ENV


def png_bytes(color=(200, 30, 30), size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(color=(30, 200, 30), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


#: fixtures that each run a whole pipeline, a job chain or the demo (minutes on 2 cores): the
#: tests that use them are marked ``slow``
SLOW_FIXTURES = {"s3_pipeline", "chain", "demo_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


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
    Prometheus endpoint waits seconds, not tens of seconds; Ray Train polls its workers every
    0.25 s (``TEST_RAY_ENV``)."""
    import ray

    from oclear_ray.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_metrics_report_interval_ms", str(METRICS_INTERVAL_MS))
    for key, value in TEST_RAY_ENV.items():
        os.environ.setdefault(key, value)
    for attempt in (1, 2):
        # Ray gives its raylet a fixed 30 s to register; on a saturated machine that can run
        # out: what the failed start left running is stopped and the start tried again.
        before = _children()
        try:
            init_ray(num_cpus=4)
            break
        except Exception:
            ray.shutdown()
            _kill(_children() - before)
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


def _children() -> set[int]:
    """Live processes whose parent is this one (Linux /proc)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[1]) == os.getpid():
                found.add(int(pid))
    return found


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def pretrained_folders(tmp_path_factory):
    """A pretrained backbone (``ROOT/cnn``) and text model (``ROOT/bert``) written the standard
    way; ``(ROOT, the backbone as saved)``."""
    from tests.tiny import PRETRAINED_WORDS, save_pretrained_backbone, save_pretrained_text

    root = tmp_path_factory.mktemp("pretrained")
    net = save_pretrained_backbone(root / "cnn")
    save_pretrained_text(root / "bert", PRETRAINED_WORDS)
    return root, net


@dataclass
class DemoRun:
    workdir: str  # the demo's work directory (later tests rerun pipelines in it)
    config: str  # the YAML config it ran with
    result: object  # typer's Result: exit_code, output
    model_dir: Path  # a copy of WORKDIR/train/model as the demo left it


@pytest.fixture(scope="session")
def demo_run(ray_cluster, pretrained_folders, tmp_path_factory) -> DemoRun:
    """``oclear demo`` (synth -> govern -> train -> embed -> index -> evaluate -> serve -> one
    search over HTTP) as a user runs it, with a relative work directory (Ray's workers and
    actors run in other directories), on the GPU recipe at CPU sizes started from pretrained
    parts (``tests.tiny.gpu_recipe_at_cpu_sizes``). One run for the session: tests/test_pipeline
    and tests/test_pretrained both check it."""
    import yaml
    from typer.testing import CliRunner

    from oclear_ray.cli import app
    from tests.tiny import gpu_recipe_at_cpu_sizes

    root = tmp_path_factory.mktemp("demo")
    config = root / "gpu-small.yaml"
    config.write_text(yaml.safe_dump(gpu_recipe_at_cpu_sizes(pretrained_folders[0])))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["demo", "--workdir", "work", "--docs", "150", "--classes", "20"]
    args += ["--config", str(config), "--steps", "4", "--port", str(port), "--once"]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.chdir(cwd)
    model = root / "work" / "train" / "model"
    if model.is_dir():  # as the demo made it (tests/test_pipeline retrains in the work dir)
        shutil.copytree(model, root / "demo-model")
    return DemoRun(str(root / "work"), str(config), result, root / "demo-model")
