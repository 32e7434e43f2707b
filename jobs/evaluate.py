"""Ray job: evaluate retrieval of labelled queries against WORKDIR/index into WORKDIR/eval.

    ray job submit --working-dir . -- python -m jobs.evaluate --workdir W \
        --queries data/eval_queries.parquet [--image-only-docs]

Writes report.json (recall@k, MAP@R, nDCG@10, per category, ANN vs exact) and report.html.
"""

from __future__ import annotations

import argparse
import json

from oclear_ray.embed import EmbedConfig
from oclear_ray.evaluate import EvalConfig, evaluate
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--queries", required=True, help="labelled queries: parquet, manifest, .tar")
    p.add_argument("--model-dir", default=None, help="default: WORKDIR/train/model")
    p.add_argument("--catalog", default=None, help="default: the catalog embeddings came from")
    p.add_argument("--format", default=None, choices=["parquet", "manifest", "webdataset"])
    p.add_argument("--image-only-docs", action="store_true", help="add the fusion ablation")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--threads-per-actor", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grid-queries", type=int, default=EvalConfig.grid_queries)
    return p.parse_args(argv)


def main(args) -> None:
    pool = EmbedConfig(
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        batch_size=args.batch_size,
    )
    report = evaluate(
        args.workdir,
        args.queries,
        model_dir=args.model_dir,
        config=EvalConfig(pool=pool, grid_queries=args.grid_queries),
        format=args.format,
        catalog=args.catalog,
        image_only_docs=args.image_only_docs,
    )
    keys = ("n_queries", "recall@1", "recall@5", "recall@10", "map@r", "ndcg@10", "ann_vs_exact")
    keys += ("fusion_ablation",) if args.image_only_docs else ()
    print(json.dumps({k: report[k] for k in keys} | {"timing_s": report["timing_s"]}, indent=2))


if __name__ == "__main__":
    init_ray()
    main(parse_args())
