"""Ray job: build or update the FAISS shards of WORKDIR/index from WORKDIR/embed.

    ray job submit --working-dir . -- python -m jobs.index --workdir W --shards 3

Builds the index when there is none; otherwise adds the documents embedded since, deletes
those no longer embedded (and any --delete ids), and rebuilds when asked (--rebuild), when the
model changed, or when changes since the build pass --rebuild-fraction.
"""

from __future__ import annotations

import json

from jobs import parser
from oclear_ray.cli import config_from, ids_to_delete
from oclear_ray.index import IndexConfig, sync_index
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    return parser("index", __doc__).parse_args(argv)


def main(args) -> None:
    config = config_from(IndexConfig, vars(args))
    delete = ids_to_delete(args.delete, args.delete_file)
    result = sync_index(args.workdir, config, rebuild=args.rebuild, delete=delete)
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    init_ray()
    main(parse_args())
