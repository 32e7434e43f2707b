"""Starting or joining Ray: every command runs on an embedded local Ray unless told otherwise."""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start an embedded Ray.

    Under ``ray job submit`` the driver already runs on the cluster and ``RAY_ADDRESS`` is set.
    ``num_cpus`` declares logical CPUs for an embedded Ray (ignored when joining a cluster);
    by default at least 4, so that a trainer's workers and its Ray Data pipeline fit side by
    side on a small machine (threads per worker are set explicitly, not from the CPU count).
    """
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    embedded = {"num_cpus": num_cpus or max(4, os.cpu_count() or 1)}
    kwargs = {"address": address} if address else embedded
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        kwargs.update(logging_level=logging.WARNING, include_dashboard=False)
        DataContext.get_current().enable_progress_bars = False
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    return ray
