"""Every entry point in jobs/ under `ray job submit --working-dir <repo>` against a real head
(started here, with its own ports, temp dir and auth token), chained on one tiny work directory:
validate -> train -> embed -> index; then one of them standalone (embedded Ray)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from oclear_ray.synth import SynthConfig, generate
from tests.local_ray import BIN, REPO, LocalHead
from tests.tiny import TINY_MODEL

# Four job drivers plus a head; minutes on a loaded 2-core machine, hence the larger timeout.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

TINY_MODEL = {
    "model": TINY_MODEL,
    "data": {"batch_size": 8, "query_batch_size": 4},
    "schedule": [{"name": "fuse", "steps": 2}],
    "run": {"workers": 1, "cpus_per_worker": 0.5, "checkpoint_every": 2, "log_every": 2},
}


@pytest.fixture(scope="module")
def head():
    """A head with the dashboard (job submission runs through it); stopped, only it, after."""
    head = LocalHead(num_cpus=4, args=("--include-dashboard=true",))
    try:
        head.start()
        yield head
    finally:
        head.stop()
    assert head.pids() == []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(str(root), SynthConfig(docs=60, classes=12, image_size=32, seed=0))
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_MODEL))
    return root


def submit(head: LocalHead, *entrypoint: str, timeout: float = 600) -> str:
    """`ray job submit --working-dir <repo> -- ENTRYPOINT`, waiting for the end; its output."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir"]
    cmd += [str(REPO), "--", *entrypoint]
    done = subprocess.run(cmd, env=head.env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{entrypoint} failed:\n{done.stdout[-4000:]}\n{done.stderr}"
    assert "succeeded" in done.stdout
    return done.stdout


def json_block(output: str) -> dict:
    """The JSON object a job prints last (its result), out of the submit log."""
    start = output.rindex("\n{") + 1
    end = output.index("\n}", start) + 2
    return json.loads(output[start:end])


@pytest.fixture(scope="module")
def chain(head, data, tmp_path_factory):
    work, timings = tmp_path_factory.mktemp("work"), {}
    py = ["python", "-m"]
    steps = {
        "validate": [*py, "jobs.validate", str(data / "catalog.parquet"), "--workdir", str(work)],
        "train": [
            *py, "jobs.train", "--catalog", str(data / "catalog.parquet"),
            "--workdir", str(work),
            "--config", str(data / "tiny.yaml"), "--workers", "1",
        ],
        "embed": [
            *py, "jobs.embed", "--catalog", str(data / "catalog.parquet"),
            "--workdir", str(work), "--actors", "1", "--cpus-per-actor", "0.5",
            "--batch-size", "16",
        ],
        "index": [*py, "jobs.index", "--workdir", str(work), "--shards", "2"],
    }  # fmt: skip
    results = {}
    for name, entrypoint in steps.items():
        start = time.monotonic()
        results[name] = json_block(submit(head, *entrypoint))
        timings[name] = round(time.monotonic() - start, 1)
    print("ray job submit seconds:", timings)
    return work, results


def test_chain_of_jobs_produces_every_artifact(chain):
    work, results = chain
    assert results["validate"]["rows"] == 60 and results["validate"]["quarantined"] == 0
    model = json.loads((work / "train" / "model" / "config.json").read_text())
    assert results["train"]["model_dir"].endswith("train/model")
    assert results["embed"]["rows"] == 60
    manifest = json.loads((work / "index" / "manifest.json").read_text())
    assert manifest["model_version"] == model["model_version"]
    assert manifest["count"] == 60 and len(manifest["shards"]) == 2
    assert results["index"]["action"] == "built" and sum(results["index"]["shards"]) == 60


def test_working_dir_upload_leaves_out_venv_and_git(head, chain):
    """What users get from `--working-dir .`: the sources, not .venv (GBs) or .git."""
    session = Path(head.temp_dir) / "session_latest" / "runtime_resources" / "working_dir_files"
    # One per submit whose sources changed in between (next to their .zip.lock files).
    packages = [p for p in session.iterdir() if p.is_dir()]
    assert packages
    for package in packages:
        names = {p.name for p in package.iterdir()}
        assert {"jobs", "oclear_ray", "pyproject.toml"} <= names
        assert not names & {".venv", ".git", "runs", "__pycache__"}


def test_entry_point_runs_standalone_on_the_same_workdir(chain, data):
    """The same module without a cluster: embedded Ray, the index rebuilt in place."""
    work, _ = chain
    before = json.loads((work / "index" / "manifest.json").read_text())["version"]
    cmd = [sys.executable, "-m", "jobs.index", "--workdir", str(work), "--rebuild"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json_block("\n" + done.stdout)
    assert result["action"] == "built" and result["count"] == 60 and result["version"] != before
