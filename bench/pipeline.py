"""The whole pipeline's cost outside training, and how often it decodes each image.

Runs ``oclear pipeline`` (``run_pipeline``: govern in its default ``auto`` mode, train, embed,
index, evaluate) on one data set with a training of ``--steps`` steps (a few: what is left is
the pipeline's own reading, checking, embedding and indexing), once with this checkout and,
with ``--before DIR``, once with another checkout of the project (e.g. a ``git worktree`` of an
earlier commit), side by side on the same data and machine. Each run is a child process with
its own local Ray, the chosen checkout first on ``PYTHONPATH``; a ``sitecustomize`` there
counts, in the driver and in every Ray worker, each image PIL decodes, by the ``oclear_ray``
function that asked for it (the contract's row checks are ``oclear_ray.contract.open_image``).

    python bench/pipeline.py --data ../shared/data/openmoji-dev --before /tmp/oclear-before
    python bench/pipeline.py --synthetic 20000 --before /tmp/oclear-before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
MARK = "bench-pipeline: "  # the child's figures line (Ray may print after it)

# Imported at start-up by every Python process of a run (driver, Ray workers, actors): counts
# decodes, one line per decode naming the oclear_ray function on the stack that asked for it.
SITECUSTOMIZE = """
import os, sys
from PIL import ImageFile

_out = os.environ["OCLEAR_BENCH_DECODES"]
_load = ImageFile.ImageFile.load


def load(self):
    if getattr(self, "tile", None):
        frame, who = sys._getframe(1), "other"
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name.startswith("oclear_ray."):
                who = f"{name}.{frame.f_code.co_name}"
                break
            frame = frame.f_back
        with open(os.path.join(_out, f"{os.getpid()}.txt"), "a") as f:
            f.write(who + "\\n")
    return _load(self)


ImageFile.ImageFile.load = load
"""


def child(args) -> None:
    """One pipeline run in this process (the checkout on PYTHONPATH); prints its figures."""
    import ray

    from oclear_ray.config import train_config
    from oclear_ray.pipeline import PipelineConfig, run_pipeline

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    cfg = PipelineConfig(
        catalog=args.catalog,
        workdir=args.workdir,
        queries=args.queries,
        eval_queries=args.eval_queries,
        train=train_config(None, workers=2, steps=args.steps),
    )
    start = time.perf_counter()
    results = run_pipeline(cfg)
    total = time.perf_counter() - start
    stages = {name: r.seconds for name, r in results.items()}
    print(MARK + json.dumps({"total_s": round(total, 1), "stages_s": stages}), flush=True)


def _rows(path: str | None) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path else 0


def run(tree: Path, data: dict, args, tmp: Path, name: str) -> dict:
    """The pipeline with ``tree``'s code: wall times and decodes per input image."""
    site, decodes, work = tmp / f"site-{name}", tmp / f"decodes-{name}", tmp / f"work-{name}"
    site.mkdir()
    decodes.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, OCLEAR_BENCH_DECODES=str(decodes))
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(site), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", "--workdir", str(work), "--steps", str(args.steps)]
    for key in ("catalog", "queries", "eval_queries"):
        if data[key]:
            cmd += [f"--{key.replace('_', '-')}", data[key]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    if out.returncode:
        raise SystemExit(f"{name} run failed:\n{out.stderr[-4000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith(MARK))
    figures = json.loads(line[len(MARK) :])
    counts = Counter()
    for f in decodes.iterdir():
        counts.update(f.read_text().split())
    images = sum(_rows(data[k]) for k in ("catalog", "queries", "eval_queries"))
    figures["images"] = images
    figures["decodes_per_image"] = {k: round(v / images, 2) for k, v in sorted(counts.items())}
    checks = sum(v for k, v in counts.items() if k.startswith("oclear_ray.contract."))
    figures["checks_per_image"] = round(checks / images, 2)
    figures["all_per_image"] = round(sum(counts.values()) / images, 2)
    figures["outside_train_s"] = round(figures["total_s"] - figures["stages_s"]["train"], 1)
    return figures


def _data(args, tmp: Path) -> dict:
    if args.synthetic:
        from oclear_ray.synth import SynthConfig, generate

        config = SynthConfig(docs=args.synthetic, classes=args.synthetic // 10, seed=3)
        paths = generate(tmp / "synthetic", config)["paths"]
        return {
            "catalog": str(paths["catalog"]),
            "queries": str(paths["queries"]),
            "eval_queries": str(paths["eval_queries"]),
        }
    root = Path(args.data).resolve()
    return {
        "catalog": str(root / "catalog.parquet"),
        "queries": str(root / "train_queries.parquet"),
        "eval_queries": str(root / "eval_queries.parquet"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="A data set in the contract (catalog.parquet, ...).")
    parser.add_argument("--synthetic", type=int, help="Or a synthetic catalog of N documents.")
    parser.add_argument("--before", help="Another checkout of the project to compare with.")
    parser.add_argument("--steps", type=int, default=5, help="Training steps of each run.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for key in ("--workdir", "--catalog", "--queries", "--eval-queries"):
        parser.add_argument(key, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not (args.data or args.synthetic):
        parser.error("give --data or --synthetic")
    with tempfile.TemporaryDirectory(prefix="oclear-bench-pipeline-") as tmp:
        tmp = Path(tmp)
        data = _data(args, tmp)
        trees = {"after": HERE} | ({"before": Path(args.before).resolve()} if args.before else {})
        runs = {}
        for name, tree in trees.items():
            runs[name] = run(tree, data, args, tmp, name)
            print(f"{name}: {json.dumps(runs[name])}", flush=True)
    if "before" in runs:
        a, b = runs["after"], runs["before"]
        print(
            f"checks (row-check decodes) per image: before {b['checks_per_image']}, after "
            f"{a['checks_per_image']}; all decodes per image: before {b['all_per_image']}, "
            f"after {a['all_per_image']}"
        )
        print(
            f"wall time outside training, after/before: "
            f"{a['outside_train_s']} / {b['outside_train_s']} s = "
            f"{a['outside_train_s'] / b['outside_train_s']:.2f}; whole pipeline "
            f"{a['total_s']} / {b['total_s']} s = {a['total_s'] / b['total_s']:.2f}"
        )


if __name__ == "__main__":
    main()
