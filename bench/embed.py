"""Ray embedding throughput vs a bare single-process PyTorch loop, same model, same threads.

    python bench/embed.py [--docs 2000] [--threads 2] [--batch-size 64] [--repeats 2]

A synthetic catalog (``oclear_ray.synth``) and a randomly initialised default model
(``ModelConfig()``: default timm backbone, small BERT, fusion), exported as training exports it.
Measured
on the wall clock, all with ``--threads`` torch threads in total:

- bare: this process runs ``DocEmbedder`` (decode, preprocess, encode, arrow output) over the
  catalog in batches, after one warm-up batch;
- ray: the embedding stage (``read`` -> ``embed_dataset``: streaming repartition into one block
  per batch -> actor pool of ``DocEmbedder``) consumed by the driver, as 1 actor x T threads and
  T actors x 1 thread. "steady" counts the rows after the first batch arrives over the time
  since (actors started, model loaded: the comparable rate); "total" includes Ray Data planning,
  actor start-up and model loading;
- job: the whole ``embed_catalog`` (validate with quarantine, clean, embed, write parts).

Runs alternate (bare, ray, ...) ``--repeats`` times and the best is kept. Other jobs on the
machine slow every figure; with more runnable threads than cores, torch intra-op threads wait for
each other and T > 1 threads in one process can be many times slower than 1 (the load average
is printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import pyarrow.parquet as pq
import torch

from oclear_ray.config import ModelConfig, TextEncoderConfig
from oclear_ray.contract import CATALOG
from oclear_ray.embed import DocEmbedder, EmbedConfig, embed_catalog, embed_dataset
from oclear_ray.export import export_model
from oclear_ray.model import RetrievalModel
from oclear_ray.read import read
from oclear_ray.runtime import init_ray
from oclear_ray.synth import SynthConfig, generate
from oclear_ray.text import train_tokenizer

GOAL = 0.9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-job", action="store_true", help="do not time the whole embed job")
    return p.parse_args(argv)


def make_inputs(root: str, args) -> tuple[str, str]:
    """A synthetic catalog and an exported random-init default model."""
    generate(
        root,
        SynthConfig(
            docs=args.docs, classes=max(10, args.docs // 10), seed=0, image_size=args.image_size
        ),
    )
    catalog = os.path.join(root, "catalog.parquet")
    tokenizer = train_tokenizer(pq.read_table(catalog, columns=["text"]).column("text").to_pylist())
    torch.manual_seed(0)
    config = ModelConfig(text=TextEncoderConfig(vocab_size=tokenizer.vocab_size))
    export_model(RetrievalModel(config).eval(), tokenizer, os.path.join(root, "model"))
    return catalog, os.path.join(root, "model")


def bare(catalog: str, model_dir: str, args) -> float:
    """Seconds for this process to embed the catalog with ``DocEmbedder`` (after a warm-up)."""
    embedder = DocEmbedder(model_dir, threads=args.threads)
    table = pq.read_table(catalog)
    embedder(table.slice(0, args.batch_size))
    start = time.perf_counter()
    for i in range(0, table.num_rows, args.batch_size):
        embedder(table.slice(i, args.batch_size))
    return time.perf_counter() - start


def ray_stage(catalog: str, model_dir: str, config: EmbedConfig) -> tuple[float, float]:
    """``(total seconds, steady rows/s)`` of the Ray embedding stage over the catalog."""
    start, first, done, first_rows = time.perf_counter(), None, 0, 0
    rows = embed_dataset(read(catalog, CATALOG), model_dir, config)
    for batch in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first is None:
            first, first_rows = time.perf_counter(), batch.num_rows
        done += batch.num_rows
    end = time.perf_counter()
    return end - start, (done - first_rows) / (end - first)


def job(catalog: str, model_dir: str, config: EmbedConfig) -> float:
    workdir = tempfile.mkdtemp(prefix="oclear-bench-embed-")
    try:
        start = time.perf_counter()
        embed_catalog(catalog, workdir, model_dir=model_dir, config=config)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(args) -> None:
    root = tempfile.mkdtemp(prefix="oclear-bench-embed-")
    catalog, model_dir = make_inputs(root, args)
    t = args.threads
    configs = {
        f"ray 1 actor x {t} threads": EmbedConfig(
            batch_size=args.batch_size, actors=1, cpus_per_actor=t, threads_per_actor=t
        ),
    }
    if t > 1:
        configs[f"ray {t} actors x 1 thread"] = EmbedConfig(
            batch_size=args.batch_size, actors=t, cpus_per_actor=1, threads_per_actor=1
        )
    init_ray(num_cpus=max(4, t + 2))
    bare_s, best = float("inf"), {name: (float("inf"), 0.0) for name in configs}
    for _ in range(args.repeats):
        bare_s = min(bare_s, bare(catalog, model_dir, args))
        for name, config in configs.items():
            total, steady = ray_stage(catalog, model_dir, config)
            best[name] = (min(best[name][0], total), max(best[name][1], steady))
    full = None if args.skip_job else job(catalog, model_dir, list(configs.values())[-1])
    report(args, args.docs / bare_s, best, full)
    shutil.rmtree(root, ignore_errors=True)


def report(args, base: float, best: dict, full: float | None) -> None:
    print(
        f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; docs {args.docs} "
        f"({args.image_size}px), batch {args.batch_size}, {args.threads} thread(s) in total; "
        f"best of {args.repeats}"
    )
    print(f"{'':34}{'docs/s':>10}{'vs bare':>10}")
    print(f"{'bare PyTorch loop':34}{base:>10.1f}{1:>10.2f}")
    for name, (total, steady) in best.items():
        print(f"{name + ', steady':34}{steady:>10.1f}{steady / base:>10.2f}")
        rate = args.docs / total
        print(f"{name + ', total':34}{rate:>10.1f}{rate / base:>10.2f}")
    if full is not None:
        rate = args.docs / full
        print(f"{'whole embed job, total':34}{rate:>10.1f}{rate / base:>10.2f}")
    top = max(steady for _, steady in best.values())
    print(f"goal: Ray steady throughput >= {GOAL:.1f}x bare: {top / base:.2f}x")


if __name__ == "__main__":
    main(parse_args())
