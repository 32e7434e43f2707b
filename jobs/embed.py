"""Ray job: embed a catalog with the exported document encoder into WORKDIR/embed parts.

    ray job submit --working-dir . -- python -m jobs.embed --catalog data/catalog.parquet \
        --workdir W --actors 2

Rerunning the same command after a kill embeds only what is missing; rerunning it with a
catalog of new documents embeds only those.
"""

from __future__ import annotations

import json

from jobs import parser
from oclear_ray.cli import config_from
from oclear_ray.embed import EmbedConfig, embed_catalog
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    return parser("embed", __doc__).parse_args(argv)


def main(args) -> None:
    config = config_from(EmbedConfig, vars(args))
    result = embed_catalog(
        args.catalog, args.workdir, model_dir=args.model_dir, config=config, format=args.format
    )
    print(json.dumps(vars(result), indent=2))


if __name__ == "__main__":
    init_ray()
    main(parse_args())
