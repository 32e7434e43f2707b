"""Ray job: embed a catalog with the exported document encoder into WORKDIR/embed parts.

    ray job submit --working-dir . -- python -m jobs.embed --catalog data/catalog.parquet \
        --workdir W --actors 2

Rerunning the same command after a kill embeds only what is missing; rerunning it with a
catalog of new documents embeds only those.
"""

from __future__ import annotations

import argparse
import json

from oclear_ray.embed import EmbedConfig, embed_catalog
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True, help="parquet, manifest or webdataset")
    p.add_argument("--workdir", required=True)
    p.add_argument("--model-dir", default=None, help="default: WORKDIR/train/model")
    p.add_argument("--format", default=None, choices=["parquet", "manifest", "webdataset"])
    p.add_argument("--actors", type=int, default=EmbedConfig.actors)
    p.add_argument("--cpus-per-actor", type=float, default=EmbedConfig.cpus_per_actor)
    p.add_argument("--threads-per-actor", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=EmbedConfig.batch_size)
    p.add_argument("--rows-per-part", type=int, default=EmbedConfig.rows_per_part)
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--image-only",
        action="store_true",
        help="embed documents from their image alone (fusion ablation; version +image-only)",
    )
    return p.parse_args(argv)


def main(args) -> None:
    config = EmbedConfig(
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        use_gpu=args.use_gpu,
        rows_per_part=args.rows_per_part,
        image_only=args.image_only,
    )
    result = embed_catalog(
        args.catalog, args.workdir, model_dir=args.model_dir, config=config, format=args.format
    )
    print(json.dumps(vars(result), indent=2))


if __name__ == "__main__":
    init_ray()
    main(parse_args())
