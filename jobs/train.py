"""Ray job: train the encoders and the sharded classifier, export them to WORKDIR/train/model.

    ray job submit --working-dir . -- python -m jobs.train --catalog data/catalog.parquet \
        --queries data/queries.parquet --workdir W --workers 2 --max-minutes 10

Rerunning the same command resumes from the last checkpoint (also with another --workers).
"""

from __future__ import annotations

import json

from jobs import parser
from oclear_ray.cli import training_config
from oclear_ray.runtime import init_ray
from oclear_ray.train import fit


def parse_args(argv=None):
    return parser("train", __doc__).parse_args(argv)


def main(args) -> None:
    result = fit(
        training_config(vars(args)),
        catalog=args.catalog,
        queries=args.queries,
        workdir=args.workdir,
        class_map=args.class_map,
    )
    print(
        json.dumps(
            {
                "model_dir": result.model_dir,
                "classes": result.num_classes,
                "class_map_version": result.class_map_version,
                "metrics": result.metrics,
                "quarantined": result.quarantined,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    init_ray()
    main(parse_args())
