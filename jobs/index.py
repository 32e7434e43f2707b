"""Ray job: build or update the FAISS shards of WORKDIR/index from WORKDIR/embed.

    ray job submit --working-dir . -- python -m jobs.index --workdir W --shards 3

Builds the index when there is none; otherwise adds the documents embedded since, deletes
those no longer embedded (and any --delete ids), and rebuilds when asked (--rebuild), when the
model changed, or when changes since the build pass --rebuild-fraction.
"""

from __future__ import annotations

import argparse
import json

from oclear_ray.index import IndexConfig, sync_index
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--shards", type=int, default=None, help="default: as built, else 1")
    p.add_argument("--factory", default=None, help="FAISS factory string; default: automatic")
    p.add_argument("--memory-gb", type=float, default=IndexConfig.memory_gb)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--rebuild-fraction", type=float, default=IndexConfig.rebuild_fraction)
    p.add_argument("--delete", nargs="*", default=[], help="doc_ids to delete")
    p.add_argument("--delete-file", default=None, help="file of doc_ids to delete, one a line")
    return p.parse_args(argv)


def read_ids(path: str | None) -> list[str]:
    if path is None:
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def main(args) -> None:
    config = IndexConfig(
        shards=args.shards,
        factory=args.factory,
        memory_gb=args.memory_gb,
        rebuild_fraction=args.rebuild_fraction,
    )
    delete = [*args.delete, *read_ids(args.delete_file)]
    result = sync_index(args.workdir, config, rebuild=args.rebuild, delete=delete)
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    init_ray()
    main(parse_args())
