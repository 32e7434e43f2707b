"""Data-wait fraction of the training step with the Ray Data ingest pipeline.

    python bench/ingest.py [--data ../shared/data/openmoji-dev] [--steps 80] [--workers 2]

Trains the default recipe for a few steps on openmoji-dev twice, side by side in one run: with
decoded images cached in the object store (the default: decode and tokenise once, then only the
per-epoch views) and streaming (read and decode from storage every epoch). Prints, per variant,
the share of the step time the workers spent waiting for data over the run (after the first
batch: the pipeline's start-up wait is printed on its own), and samples/s. Goal: the default
waits <= 5 % of its step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

from jobs import add_options
from oclear_ray.config import train_config
from oclear_ray.runtime import init_ray
from oclear_ray.train import fit


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/openmoji-dev")
    )
    add_options(p, "train", only=("config", "workers", "steps"))  # as `oclear train` has them
    p.set_defaults(steps=80, workers=2)
    return p.parse_args()


def run(cfg, data: str) -> dict:
    workdir = tempfile.mkdtemp(prefix="oclear-bench-ingest-")
    t0 = time.time()
    result = fit(
        cfg,
        catalog=os.path.join(data, "catalog.parquet"),
        queries=os.path.join(data, "train_queries.parquet"),
        workdir=workdir,
    )
    m = result.metrics or {}
    return {
        "wall_s": round(time.time() - t0, 1),
        "steps": m.get("step"),
        "run_data_wait": m.get("run_data_wait"),
        "startup_wait_s": m.get("startup_wait_s"),
        "last_samples_per_s": m.get("samples_per_s"),
    }


def main(args):
    init_ray()
    base = train_config(args.config, workers=args.workers, steps=args.steps)
    base = dataclasses.replace(base, run=dataclasses.replace(base.run, checkpoint_every=10**6))
    figures = {}
    for name, cache in (("cached", True), ("streaming", False)):
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, cache=cache))
        figures[name] = run(cfg, args.data)
    print(json.dumps(figures, indent=2))
    for name, f in figures.items():
        print(
            f"{name}: data wait {100 * f['run_data_wait']:.1f} % of the step time (goal <= 5 %), "
            f"after {f['startup_wait_s']:.1f} s for the pipeline to start"
        )
    ratio = figures["streaming"]["run_data_wait"] / max(figures["cached"]["run_data_wait"], 1e-9)
    print(f"streaming / cached data-wait ratio: {ratio:.1f}x")


if __name__ == "__main__":
    main(parse_args())
