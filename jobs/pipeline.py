"""Ray job: govern -> train -> embed -> index -> evaluate, skipping every stage that is current.

    ray job submit --working-dir . -- python -m jobs.pipeline --catalog s3://bucket/catalog \
        --queries s3://bucket/queries --eval-queries s3://bucket/eval --workdir s3://bucket/run

Rerunning it resumes: finished stages are skipped, an interrupted training resumes from its
last checkpoint.
"""

from __future__ import annotations

import argparse
import json

from jobs import add_training_options, training_config
from oclear_ray.pipeline import GOVERN_MODES, PipelineConfig, run_pipeline
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--queries", default=None, help="training query photos (optional)")
    p.add_argument("--eval-queries", default=None, help="labelled queries to evaluate on")
    add_training_options(p)
    p.add_argument(
        "--govern",
        choices=GOVERN_MODES,
        default="auto",
        help="auto: apply the class map when a probe training says it helps",
    )
    p.add_argument("--fusion-ablation", action="store_true")
    return p.parse_args(argv)


def main(args) -> None:
    cfg = PipelineConfig(
        catalog=args.catalog,
        workdir=args.workdir,
        queries=args.queries,
        eval_queries=args.eval_queries,
        train=training_config(args),
        fusion_ablation=args.fusion_ablation,
        govern_mode=args.govern,
    )

    def log(stage, status, info):
        print(f"[oclear pipeline] {stage}: {status} {json.dumps(info)}", flush=True)

    results = run_pipeline(cfg, log=log)
    print(json.dumps({k: vars(v) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    init_ray()
    main(parse_args())
