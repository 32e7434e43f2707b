"""Ray job: check a catalog or query set against the data contract and quarantine bad rows.

ray job submit --working-dir . -- python -m jobs.validate data/catalog.parquet --workdir W
"""

from __future__ import annotations

import json
import sys

from jobs import parser
from oclear_ray.contract import Limits
from oclear_ray.read import validate_source
from oclear_ray.runtime import init_ray


def parse_args(argv=None):
    return parser("validate", __doc__).parse_args(argv)


def main(args) -> int:
    report = validate_source(
        args.path,
        kind=args.kind,
        format=args.format,
        workdir=args.workdir,
        quarantine=args.quarantine,
        limits=Limits(max_pixels=args.max_pixels),
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0 if report.usable else 1


if __name__ == "__main__":
    init_ray()
    sys.exit(main(parse_args()))
