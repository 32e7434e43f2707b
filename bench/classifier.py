"""Sharded vs replicated margin-softmax head on 2 gloo processes: memory and step time.

    python bench/classifier.py [--classes 1000000 2000000] [--dim 128] [--batch 256] [--steps N]

For each class count, three heads are trained for a few SGD-with-momentum steps on random
embeddings, each in a fresh pair of processes (so peak RSS is per head):

- sharded: ``ShardedMarginSoftmax`` over the 2 ranks (each owns half of the centres);
- replicated: every rank holds all centres and computes the full logits of its local batch,
  gradients all-reduced by DDP (the same head code with ``world_size=1``, wrapped in DDP);
- sampled: the sharded head with ``sample_rate=0.1`` (Partial FC).

Reported per rank: head bytes (weight + grad + momentum), peak RSS growth over the run, and
the median step time (forward + backward + optimizer step, slowest rank) after warm-up, and
the 1-minute load average around the run: other jobs on the machine inflate step times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from oclear_ray.classifier import ClassifierConfig, ShardedMarginSoftmax

WORLD = 2
HEADS = ("sharded", "replicated", "sampled")
GOALS = {"memory": 0.55, "step": 0.6, "sampling speed-up": 2.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 2_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256, help="local batch per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    return parser.parse_args()


def build_head(kind: str, num_classes: int, dim: int) -> torch.nn.Module:
    rate = 0.1 if kind == "sampled" else 1.0
    config = ClassifierConfig(num_classes=num_classes, dim=dim, sample_rate=rate)
    if kind != "replicated":
        return ShardedMarginSoftmax(config)
    return DistributedDataParallel(
        ShardedMarginSoftmax(config, world_size=1), gradient_as_bucket_view=True
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def head_bytes(head: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the head's parameters, their gradients and the optimizer state."""
    tensors = [p for p in head.parameters()] + [p.grad for p in head.parameters()]
    tensors += [t for state in optimizer.state.values() for t in state.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def timed_step(head, optimizer, emb, labels) -> list[float]:
    """One training step; seconds spent in forward, backward and optimizer step."""
    dist.barrier()
    marks = [time.perf_counter()]
    loss = head(emb, labels)
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    optimizer.step()
    optimizer.zero_grad()
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def worker(rank: int, kind: str, num_classes: int, args, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(rank)
    batches = [
        (torch.randn(args.batch, args.dim), torch.randint(0, num_classes, (args.batch,)))
        for _ in range(2)
    ]
    base_rss = rss_bytes()
    head = build_head(kind, num_classes, args.dim)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    phases = [timed_step(head, optimizer, *batches[i % 2]) for i in range(args.warmup + args.steps)]
    phases = torch.tensor(phases[args.warmup :], dtype=torch.float64)
    dist.all_reduce(phases, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    memory = torch.tensor([head_bytes(head, optimizer), peak_rss_bytes() - base_rss])
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {
            "step": statistics.median(phases.sum(1).tolist()),
            "phases": phases.median(0).values.tolist(),
            "head_bytes": int(memory[0]),
            "rss_bytes": int(memory[1]),
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(kind: str, num_classes: int, args) -> dict:
    """Run one head in a fresh pair of processes; note the machine's load (other jobs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        load = os.getloadavg()[0]
        mp.spawn(worker, args=(kind, num_classes, args, free_port(), out), nprocs=WORLD)
        with open(out) as f:
            return json.load(f) | {"load": (load + os.getloadavg()[0]) / 2}


def report(num_classes: int, results: dict[str, dict]) -> None:
    print(f"\n{num_classes:,} classes")
    columns = f"{'head MiB':>10}{'peak RSS +MiB':>15}{'step s':>9}{'load':>6}"
    print(f"  {'head':<11}{columns}   fwd/bwd/opt s")
    for kind, r in results.items():
        phases = " / ".join(f"{p:.2f}" for p in r["phases"])
        print(
            f"  {kind:<11}{r['head_bytes'] / 2**20:>10.0f}{r['rss_bytes'] / 2**20:>15.0f}"
            f"{r['step']:>9.2f}{r['load']:>6.1f}   {phases}"
        )
    sharded, replicated = results["sharded"], results["replicated"]
    ratios = {
        "memory": sharded["head_bytes"] / replicated["head_bytes"],
        "peak RSS": sharded["rss_bytes"] / replicated["rss_bytes"],
        "step": sharded["step"] / replicated["step"],
        "sampling speed-up": sharded["step"] / results["sampled"]["step"],
    }
    for name, value in ratios.items():
        goal = GOALS.get(name)
        verdict = ""
        if goal is not None:
            met = value >= goal if name == "sampling speed-up" else value <= goal
            verdict = f"  (goal {'>=' if name == 'sampling speed-up' else '<='} {goal}: "
            verdict += "met)" if met else "MISSED)"
        label = name if name == "sampling speed-up" else f"sharded/replicated {name}"
        print(f"  {label:<32}{value:6.2f}{verdict}")


def main(args: argparse.Namespace) -> None:
    print(f"{WORLD} gloo processes x 1 thread, dim {args.dim}, local batch {args.batch}")
    for num_classes in args.classes:
        report(num_classes, {kind: measure(kind, num_classes, args) for kind in HEADS})


if __name__ == "__main__":
    main(parse_args())
