"""Ray job: evaluate retrieval of labelled queries against WORKDIR/index into WORKDIR/eval.

    ray job submit --working-dir . -- python -m jobs.evaluate --workdir W \
        --queries data/eval_queries.parquet [--image-only-docs]

Writes report.json (recall@k, MAP@R, nDCG@10, per category, ANN vs exact) and report.html.
"""

from __future__ import annotations

import json

from jobs import parser
from oclear_ray.cli import config_from
from oclear_ray.embed import EmbedConfig
from oclear_ray.evaluate import EvalConfig, evaluate
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    p = parser("eval", __doc__)
    p.add_argument(
        "--batch-size", type=int, default=EmbedConfig.batch_size, help="Queries per encoder call."
    )
    return p.parse_args(argv)


def main(args) -> None:
    pool = config_from(EmbedConfig, vars(args))
    report = evaluate(
        args.workdir,
        args.queries,
        model_dir=args.model_dir,
        config=EvalConfig(pool=pool, grid_queries=args.grid_queries),
        format=args.format,
        catalog=args.catalog,
        image_only_docs=args.image_only_docs,
        judgments=args.judgments,
    )
    keys = (
        "n_queries",
        "relevance",
        "recall@1",
        "recall@5",
        "recall@10",
        "map@r",
        "ndcg@10",
        "ann_vs_exact",
    )
    keys += ("fusion_ablation",) if args.image_only_docs else ()
    print(json.dumps({k: report[k] for k in keys} | {"timing_s": report["timing_s"]}, indent=2))


if __name__ == "__main__":
    init_ray()
    main(parse_args())
