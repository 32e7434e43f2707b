"""FSDP2 against DDP for the encoders, on 2 gloo processes, against one process: samples/s.

    python bench/parallel.py [--config configs/cpu-small.yaml] [--steps 12] [--load 0 0.5]

The platform's model and sharded head (``train._build``: ``run.fsdp`` true or false) train
align steps on random 64 px batches of the config's sizes (documents, plus as many query views),
one torch thread per rank, each pair of ranks in fresh processes; beside them one process with
two threads and the same samples a step (the bare loop's layout).
``--load L`` runs busy-wait processes taking L cores in all beside each measurement, as Ray's own
processes and the Ray Data tasks do beside the trainers on a small machine: every collective
then waits for the rank they held up. Reported: the median step time after warm-up (slowest
rank), samples/s, and each over FSDP2's.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from oclear_ray.config import train_config
from oclear_ray.train import Batch, _build, train_step

CLASSES, WORLD = 2464, 2  # openmoji-dev's classes
LAYOUTS = ("fsdp", "ddp", "one process")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=int, default=12, help="timed steps after 3 warm-up steps")
    p.add_argument("--load", type=float, nargs="+", default=[0.0, 0.5], help="cores kept busy")
    return p.parse_args()


def _batch(cfg, gen: torch.Generator, scale: int = 1) -> Batch:
    """Documents and as many query views, ``scale`` times a worker's batch (no text)."""
    n, size = cfg.data.batch_size * scale, cfg.model.preprocess.image_size
    docs, queries = torch.randn(2, n, 3, size, size, generator=gen)
    labels = torch.randint(0, CLASSES, (2, n), generator=gen)
    empty = torch.zeros(n, 1, dtype=torch.long)
    return Batch(docs, empty, empty, labels[0], queries, labels[1])


def _steps(cfg, args, world: int, rank: int = 0) -> list[float]:
    """Step times of one rank (forward, backward, optimizer steps)."""
    model, head, optim, head_optim = _build(cfg, CLASSES, torch.device("cpu"))
    gen, times = torch.Generator().manual_seed(rank), []
    for _ in range(3 + args.steps):
        batch = _batch(cfg, gen, scale=2 if world == 1 else 1)
        start = time.perf_counter()
        train_step(model, head, batch, towers="image").backward()
        optim.step(), head_optim.step()
        optim.zero_grad(set_to_none=True), head_optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[3:]


def _rank(rank: int, layout: str, port: int, cfg, args, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    run = dataclasses.replace(cfg.run, workers=WORLD, fsdp=layout == "fsdp")
    times = _steps(dataclasses.replace(cfg, run=run), args, WORLD, rank)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, times)
    if rank == 0:
        out.put([max(ts) for ts in zip(*gathered, strict=True)])
    dist.destroy_process_group()


def _solo(cfg, args, out) -> None:
    torch.set_num_threads(WORLD)
    out.put(_steps(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, workers=1)), args, 1))


def _busy(share: float) -> None:
    while True:  # share of one core: busy, then asleep, every 10 ms
        start = time.perf_counter()
        while time.perf_counter() - start < 0.01 * share:
            pass
        time.sleep(0.01 * (1 - share))


def measure(layout: str, cfg, args, load: float) -> float:
    """Median step time of ``layout`` with ``load`` cores kept busy beside it."""
    ctx = multiprocessing.get_context("spawn")
    hogs = [ctx.Process(target=_busy, args=(load / WORLD,), daemon=True) for _ in range(WORLD)]
    for hog in hogs if load else ():
        hog.start()
    out = ctx.SimpleQueue()
    try:
        if layout == "one process":
            proc = ctx.Process(target=_solo, args=(cfg, args, out))
            proc.start(), proc.join()
        else:
            mp.spawn(_rank, args=(layout, free_port(), cfg, args, out), nprocs=WORLD)
        return statistics.median(out.get())
    finally:
        for hog in hogs if load else ():
            hog.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args) -> None:
    cfg = train_config(args.config)
    samples = 2 * cfg.data.batch_size * WORLD  # documents and as many query views, both ranks
    print(
        f"{samples} samples a step ({cfg.model.image.name} at {cfg.model.preprocess.image_size} px)"
    )
    print(f"{'load':>5} {'layout':<12} {'s/step':>7} {'samples/s':>9} {'/ fsdp':>7}")
    for load in args.load:
        times = {layout: measure(layout, cfg, args, load) for layout in LAYOUTS}
        for layout, t in times.items():
            print(f"{load:5.2f} {layout:<12} {t:7.3f} {samples / t:9.0f} {times['fsdp'] / t:7.2f}")


if __name__ == "__main__":
    main(parse_args())
