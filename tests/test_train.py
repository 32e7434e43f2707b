"""The train stage end to end on a local Ray: FSDP2 + sharded head on 2 workers, a worker killed
mid-run and recovered from its checkpoint, then a resume of that run with 1 worker."""

import json
import os
import signal
import threading
import time

import pytest

from oclear_ray.config import TrainConfig
from oclear_ray.export import load_doc_encoder, load_query_encoder
from oclear_ray.synth import SynthConfig, generate
from oclear_ray.train import fit

pytestmark = pytest.mark.ray


def small_config(*, workers: int, fuse_steps: int) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {
                "image": {"name": "resnet10t"},
                "text": {
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "intermediate_size": 64,
                    "max_position_embeddings": 16,
                },
                "fusion": {"dim": 32, "num_heads": 2, "num_concepts": 2},
                "preprocess": {"image_size": 32, "max_text_length": 16},
                "embed_dim": 32,
            },
            "data": {"batch_size": 8, "query_batch_size": 4},
            "schedule": [
                {"name": "align", "steps": 4, "towers": "image"},
                {"name": "fuse", "steps": fuse_steps},
            ],
            "run": {"workers": workers, "checkpoint_every": 4, "log_every": 4, "max_failures": 2},
        }
    )


def _train_worker_pids() -> list[int]:
    """Processes Ray titles ``ray::RayTrainWorker...`` (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def _kill_a_worker_after_a_checkpoint(run_dir, stop: threading.Event, killed: list):
    """Wait until Ray Train has registered a checkpoint, then SIGKILL one worker process."""
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    while not stop.is_set():
        try:
            with open(snapshot) as f:
                done = json.load(f).get("latest_checkpoint_result") is not None
        except (OSError, ValueError):
            done = False
        pids = _train_worker_pids() if done else []
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            return
        time.sleep(0.2)


def test_train_kill_recover_and_resume_with_fewer_workers(ray_cluster, tmp_path):
    data = tmp_path / "data"
    generate(data, SynthConfig(docs=160, classes=24, queries_per_class=2, seed=3))
    workdir = str(tmp_path / "work")
    run_dir = os.path.join(workdir, "train", "runs", "train")

    stop, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_a_worker_after_a_checkpoint, args=(run_dir, stop, killed)
    )
    killer.start()
    try:
        first = fit(
            small_config(workers=2, fuse_steps=36),
            catalog=str(data / "catalog.parquet"),
            queries=str(data / "queries.parquet"),
            workdir=workdir,
        )
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    assert first.metrics["step"] == 40
    assert first.metrics["resumed_from"] >= 4  # the restarted group continued from a checkpoint
    assert first.num_classes == 24 + 0  # synth labels: classes + aliases - broad pairs
    doc = load_doc_encoder(first.model_dir)
    version = doc.model_version

    second = fit(
        small_config(workers=1, fuse_steps=44),
        catalog=str(data / "catalog.parquet"),
        queries=str(data / "queries.parquet"),
        workdir=workdir,
    )
    assert second.metrics["resumed_from"] == 40  # the 2-worker checkpoint, loaded by 1 worker
    assert second.metrics["step"] == 48
    query = load_query_encoder(second.model_dir)
    assert query.model_version != version
    emb = query.encode_query(images=[_first_image(data).read_bytes()])
    assert emb.shape == (1, 32)


def _first_image(data):
    import pyarrow.parquet as pq

    row = pq.read_table(data / "catalog.parquet").slice(0, 1).to_pylist()[0]
    path = data / "first.png"
    path.write_bytes(row["image"])
    return path
