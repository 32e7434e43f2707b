"""Starting or joining Ray: every command runs on an embedded local Ray unless told otherwise."""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start an embedded Ray.

    Under ``ray job submit`` the driver already runs on the cluster and ``RAY_ADDRESS`` is set.
    ``num_cpus`` declares logical CPUs for an embedded Ray (ignored when joining a cluster).
    """
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"address": address} if address else {"num_cpus": num_cpus}
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        kwargs.update(logging_level=logging.WARNING, include_dashboard=False)
        DataContext.get_current().enable_progress_bars = False
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    return ray
