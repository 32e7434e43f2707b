"""Ray job: organise the catalog's classes (skew, noisy labels, merges, splits) into
WORKDIR/govern/ (class_map.json, report.json, report.md, report.html) for the training job.

    ray job submit --working-dir . -- python -m jobs.govern --catalog data/catalog.parquet \
        --workdir W [--queries data/queries.parquet] [--model W/train/model] [--policy none] \
        [--review review.yaml]
"""

from __future__ import annotations

import json

from jobs import parser
from oclear_ray.classmap import load_class_map
from oclear_ray.govern import GovernConfig, govern, score_against_truth
from oclear_ray.review import load_review
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    return parser("govern", __doc__).parse_args(argv)


def main(args) -> dict:
    config = GovernConfig(policy=args.policy, cap=args.cap)
    result = govern(
        args.catalog,
        args.workdir,
        config=config,
        model_dir=args.model_dir,
        queries=args.queries,
        review=load_review(args.review) if args.review else None,
    )
    out = {"class_map": result.class_map_path, "version": result.version}
    out.update({k: result.report[k] for k in ("labels", "classes", "relabelled", "dropped")})
    if args.truth:
        with open(args.truth) as f:
            out["scores"] = score_against_truth(load_class_map(result.class_map_path), json.load(f))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    init_ray()
    main(parse_args())
