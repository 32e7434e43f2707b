"""Ray job: govern -> train -> embed -> index -> evaluate, skipping every stage that is current.

    ray job submit --working-dir . -- python -m jobs.pipeline --catalog s3://bucket/catalog \
        --queries s3://bucket/queries --eval-queries s3://bucket/eval --workdir s3://bucket/run

Rerunning it resumes: finished stages are skipped, an interrupted training resumes from its
last checkpoint.
"""

from __future__ import annotations

import json

from jobs import parser
from oclear_ray.cli import training_config
from oclear_ray.pipeline import PipelineConfig, run_pipeline
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    return parser("pipeline", __doc__).parse_args(argv)


def main(args) -> None:
    cfg = PipelineConfig(
        catalog=args.catalog,
        workdir=args.workdir,
        queries=args.queries,
        eval_queries=args.eval_queries,
        eval_judgments=args.eval_judgments,
        train=training_config(vars(args)),
        fusion_ablation=args.fusion_ablation,
        govern_mode=args.govern,
        views=args.views,
    )

    def log(stage, status, info):
        print(f"[oclear pipeline] {stage}: {status} {json.dumps(info)}", flush=True)

    results = run_pipeline(cfg, log=log)
    print(json.dumps({k: vars(v) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    init_ray()
    main(parse_args())
