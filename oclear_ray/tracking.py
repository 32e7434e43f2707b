"""Tracked runs with MLflow: every training and evaluation run is one MLflow run.

A training run holds the full resolved config as params and the per-step metrics that Ray
Train's rank 0 reports; an evaluation run holds its inputs as params, the metrics of
``report.json`` and ``report.html`` / ``report.json`` as artifacts. Both carry the model
version as a tag, so that an evaluation finds its training.

The store is MLflow's SQLite backend under ``WORKDIR/mlflow`` (``mlflow.db`` and
``artifacts/``) unless a tracking URI is given (``--tracking-uri`` or ``MLFLOW_TRACKING_URI``,
e.g. ``http://mlflow:5000``). A work directory on shared storage (``s3://...``) has no local
folder for the database: its runs are tracked only with a tracking URI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property

from oclear_ray import storage

EXPERIMENT = "oclear"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tracking:
    """Where runs are recorded: an MLflow tracking URI, the experiment, and where a new
    experiment keeps its artifacts (None: the store's default)."""

    uri: str
    experiment: str = EXPERIMENT
    artifacts: str | None = None


def tracking_for(workdir: str, uri: str | None = None) -> Tracking | None:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store under ``WORKDIR/mlflow``;
    None (with a warning) for a work directory on shared storage and no URI."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Tracking(uri)
    if storage.is_uri(workdir):
        log.warning("runs are not tracked: %s is not a local folder; pass --tracking-uri", workdir)
        return None
    folder = os.path.join(storage.absolute(workdir), "mlflow")
    os.makedirs(folder, exist_ok=True)
    return Tracking(f"sqlite:///{folder}/mlflow.db", artifacts=os.path.join(folder, "artifacts"))


def _client(uri: str):
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # store creation logs every migration
    return MlflowClient(uri)


@dataclass(frozen=True)
class RunRef:
    """One open run (picklable: Ray Train's rank 0 logs through it from its own process)."""

    uri: str
    run_id: str

    @cached_property
    def client(self):
        return _client(self.uri)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """The numeric values of ``metrics`` (nested dicts flattened to dotted keys)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step or 0) for k, v in numeric_items(metrics)]
        self.client.log_batch(self.run_id, metrics=rows)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_files(self, paths: list[str], folder: str | None = None) -> None:
        """Files of a local folder or shared storage as artifacts (under ``folder``)."""
        with tempfile.TemporaryDirectory() as tmp:
            for path in paths:
                local = os.path.join(tmp, os.path.basename(path))
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(path))
            self.client.log_artifacts(self.run_id, tmp, folder)


@contextlib.contextmanager
def start_run(tracking: Tracking | None, name: str, *, params: dict, tags: dict | None = None):
    """A new run named ``name`` with ``params`` (flattened); yields its :class:`RunRef` (None
    when not tracking). The run ends FINISHED, or FAILED when the block raises."""
    if tracking is None:
        yield None
        return
    from mlflow.entities import Param

    client = _client(tracking.uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(tracking.experiment, tracking.artifacts)
    )
    run = client.create_run(
        experiment_id, run_name=name, tags={"oclear.stage": name, **(tags or {})}
    )
    ref = RunRef(tracking.uri, run.info.run_id)
    client.log_batch(ref.run_id, params=[Param(k, v) for k, v in param_items(params)])
    status = "FAILED"
    try:
        yield ref
        status = "FINISHED"
    finally:
        client.set_terminated(ref.run_id, status)


def metric_key(key: str) -> str:
    """A key MLflow accepts: ``recall@10`` -> ``recall_at_10``, other odd characters -> ``_``."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


def _flat(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield metric_key(f"{prefix}{key}"), value


def numeric_items(tree: dict) -> list[tuple[str, float]]:
    """Numeric leaves (not booleans) of a nested dict, dotted keys."""
    return [
        (k, v) for k, v in _flat(tree) if isinstance(v, int | float) and not isinstance(v, bool)
    ]


def param_items(tree: dict, limit: int = 6000) -> list[tuple[str, str]]:
    """Every leaf of a nested dict as a string param (lists as JSON), cut to MLflow's limit."""
    return [(k, (json.dumps(v) if isinstance(v, list) else str(v))[:limit]) for k, v in _flat(tree)]


#: report fields that say what was evaluated: params of the run, not metrics
_EVAL_PARAMS = ("model_version", "embeddings_version", "index_version", "index_factory")


def record_evaluation(tracking: Tracking | None, report: dict, eval_dir: str) -> str | None:
    """One finished run for an evaluation: its inputs and versions as params, the report's
    numbers as metrics, ``report.json`` and ``report.html`` as artifacts; the run id."""
    params = {**report["inputs"], **{k: report[k] for k in _EVAL_PARAMS if k in report}}
    tags = {"model_version": report["model_version"]}
    with start_run(tracking, "evaluate", params=params, tags=tags) as run:
        if run is None:
            return None
        numbers = {k: v for k, v in report.items() if k not in ("inputs", *_EVAL_PARAMS)}
        run.log_metrics(numbers)
        names = ("report.json", "report.html")
        run.log_files([storage.join(eval_dir, name) for name in names])
        return run.run_id
