"""Helpers that several test modules share: a model for a synthetic catalog, gloo ranks."""

from __future__ import annotations

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
