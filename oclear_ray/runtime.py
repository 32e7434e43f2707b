"""Starting or joining Ray, and where its output goes.

Every command runs on an embedded local Ray unless told otherwise. Quiet (the default), Ray's
own output stays off the terminal: workers' and actors' logs are not forwarded to the driver
(they stay in Ray's session folder), and everything the driver process writes (the
``ray`` loggers, Ray Data plans, warnings, native libraries) goes to a log file under the work
directory, while the command's own output keeps the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from contextlib import contextmanager


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    quiet: bool = True,
    logging_level: int = logging.WARNING,
):
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start an embedded Ray.

    Under ``ray job submit`` the driver already runs on the cluster and ``RAY_ADDRESS`` is set.
    ``num_cpus`` declares logical CPUs for an embedded Ray (ignored when joining a cluster);
    by default at least 4, so that a trainer's workers and its Ray Data pipeline fit side by
    side on a small machine (threads per worker are set explicitly, not from the CPU count).
    ``quiet``: workers' output is not forwarded to the driver, Ray Data draws no progress
    bars (the command draws its own) and the driver's ``ray`` loggers log at ``logging_level``
    (the CLI, which sends them to its log file, takes INFO).
    """
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    embedded = {"num_cpus": num_cpus or max(4, os.cpu_count() or 1)}
    kwargs = {"address": address} if address else embedded
    if quiet:
        kwargs.update(log_to_driver=False, include_dashboard=False, logging_level=logging_level)
        logging.getLogger("ray.data").setLevel(logging_level)  # it has handlers of its own
        DataContext.get_current().enable_progress_bars = False
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    logging.getLogger(__name__).info("Ray's own logs: %s", ray_logs_dir())
    return ray


def ray_logs_dir() -> str | None:
    """The logs folder of this driver's Ray session (on the head node when joined)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else None


def log_dir(workdir: str | None) -> str:
    """``WORKDIR/logs`` for a local work directory; a local temporary folder for one on
    shared storage (``s3://...``) or none (the log is written by this process)."""
    if workdir and "://" not in workdir:
        return os.path.join(os.path.abspath(workdir), "logs")
    return os.path.join(tempfile.gettempdir(), "oclear-logs")


@contextmanager
def quiet_output(log_file: str):
    """Send everything this process writes to stdout and stderr (file descriptors 1 and 2, so
    native libraries and Ray's driver-side messages too) to ``log_file``, with Python's
    ``logging`` at INFO and warnings captured; yields text streams ``(stdout, stderr)`` on the
    original terminal for the command's own output. Without real descriptors (a test runner's
    buffers), yields ``sys.stdout`` and ``sys.stderr`` unchanged."""
    try:
        fds = (sys.stdout.fileno(), sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        fds = None
    if fds != (1, 2):
        yield sys.stdout, sys.stderr
        return
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1), os.dup2(log_fd, 2)
    os.close(log_fd)
    logging.captureWarnings(True)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    terminals = [os.fdopen(os.dup(fd), "w", buffering=1) for fd in saved]
    try:
        yield tuple(terminals)
    finally:
        root.removeHandler(handler)
        sys.stdout.flush(), sys.stderr.flush()
        for fd, (target, terminal) in enumerate(zip(saved, terminals, strict=True), 1):
            terminal.flush()
            os.dup2(target, fd)
            os.close(target)
            terminal.close()


@contextmanager
def forward_reports(callback):
    """Ray Train callbacks that hand what rank 0 reports (``ray.train.report``) to
    ``callback(metrics)`` in this driver process while ``trainer.fit()`` runs; yields the
    list for ``RunConfig(callbacks=...)`` (empty when ``callback`` is None)."""
    if callback is None:
        yield []
        return
    from ray.train import UserCallback
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})

    class Forward(UserCallback):
        """Runs on the Train controller: puts rank 0's metrics on the queue."""

        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                self.queue.put_nowait(metrics[0])

    stop = threading.Event()

    def drain():
        while not stop.is_set():
            try:
                callback(queue.get(timeout=0.5))
            except Empty:
                continue

    thread = threading.Thread(target=drain, name="oclear-train-reports", daemon=True)
    thread.start()
    try:
        yield [Forward(queue)]
    finally:
        stop.set()
        thread.join()
        while not queue.empty():  # the controller put every report before fit() returned
            callback(queue.get_nowait())
        queue.shutdown()
