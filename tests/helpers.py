"""Helpers that several test modules share: a model for a synthetic catalog, gloo ranks."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager


def catalog_model(catalog: str, out) -> str:
    """A small random-init model, its tokenizer trained on the titles of ``catalog`` (parquet),
    exported into ``out`` the way training exports it; returns ``out``."""
    import pyarrow.parquet as pq

    from tests.tiny import export_random_model

    texts = pq.read_table(catalog, columns=["text"]).column("text").to_pylist()
    export_random_model(texts, out)
    return str(out)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """This process as ``rank`` of a ``world``-rank gloo group on ``port`` (one torch thread)
    for the ``with`` block."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_worker_pids() -> list[int]:
    """Processes Ray titles ``ray::RayTrainWorker...`` that this driver's Ray started: children
    of its raylet (Linux /proc), never those of another Ray on the same machine."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path().encode()
    raylets, workers = set(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmdline.startswith(b"ray::RayTrainWorker"):
            workers.append((int(pid), parent))
        elif b"/raylet/raylet" in cmdline and session in cmdline:
            raylets.add(int(pid))
    return [pid for pid, parent in workers if parent in raylets]
