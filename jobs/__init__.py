"""Ray job entry points (``python -m jobs.<stage>``); the options they share live here."""

from __future__ import annotations

import argparse


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The training options of ``jobs.train`` and ``jobs.pipeline``, as the CLI has them."""
    p.add_argument("--config", default=None, help="YAML training config")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="scale the schedule to this many steps")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="training wall-time budget: alone, the schedule fills it; with --steps, a cap",
    )
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training config field, e.g. optim.lr=1e-3 (repeatable)",
    )


def training_config(args: argparse.Namespace):
    """The training config those options ask for."""
    from oclear_ray.config import train_config

    return train_config(
        args.config,
        workers=args.workers,
        steps=args.steps,
        max_minutes=args.max_minutes,
        use_gpu=args.use_gpu,
        sets=args.set,
    )
