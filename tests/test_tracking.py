"""Tracked runs: where the store is, what a run holds, read back through the MLflow client (no
Ray here; the training and evaluation runs of the demo are read back in test_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from oclear_ray.tracking import (
    Tracking,
    metric_key,
    numeric_items,
    param_items,
    record_evaluation,
    start_run,
    tracking_for,
)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One store for the module (creating a SQLite store runs MLflow's migrations: seconds)."""
    return tracking_for(str(tmp_path_factory.mktemp("tracked")))


def test_the_store_is_the_uri_given_else_the_environment_else_the_work_directory(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = tracking_for(str(tmp_path / "w"))
    assert local.uri == f"sqlite:///{tmp_path}/w/mlflow/mlflow.db"
    assert local.artifacts == f"{tmp_path}/w/mlflow/artifacts"
    assert tracking_for("s3://bucket/w") is None  # no local folder for the database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_for(str(tmp_path / "w")) == Tracking("http://mlflow:5000")
    assert tracking_for("s3://bucket/w", "http://other:5000") == Tracking("http://other:5000")


def test_keys_and_values_are_flattened_into_what_mlflow_accepts():
    tree = {"recall@1": 0.5, "exact": {"ndcg@10": 1}, "ok": True, "name": "x", "ks": [1, 5]}
    assert numeric_items(tree) == [("recall_at_1", 0.5), ("exact.ndcg_at_10", 1)]
    assert metric_key("per_category.a b/c(d)") == "per_category.a b/c_d_"
    params = dict(param_items({**tree, "long": "y" * 7000}))
    assert params["ks"] == "[1, 5]" and params["ok"] == "True" and len(params["long"]) == 6000


def test_a_run_holds_its_params_metrics_by_step_and_status(tracking):
    config = {"optim": {"lr": 0.001}, "schedule": [{"name": "align", "steps": 2}]}
    with start_run(tracking, "train", params={"config": config}) as run:
        for step, loss in ((10, 3.0), (20, 2.5)):
            run.log_metrics({"loss": loss, "stage": "align"}, step)
        run.set_tags({"model_version": "abc"})
    with pytest.raises(RuntimeError, match="boom"), start_run(tracking, "train", params={}) as bad:
        raise RuntimeError("boom")
    client = MlflowClient(tracking.uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and client.get_run(bad.run_id).info.status == "FAILED"
    assert got.data.params["config.optim.lr"] == "0.001"
    assert json.loads(got.data.params["config.schedule"]) == config["schedule"]
    assert got.data.tags["model_version"] == "abc" and got.data.tags["oclear.stage"] == "train"
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 3.0), (20, 2.5)]
    assert "stage" not in got.data.metrics
    experiment = client.get_experiment(got.info.experiment_id)
    assert experiment.name == "oclear"
    assert experiment.artifact_location.endswith(tracking.artifacts)


def test_no_tracking_yields_no_run():
    with start_run(None, "train", params={"a": 1}) as run:
        assert run is None
    assert record_evaluation(None, {"inputs": {}, "model_version": "v"}, "/nowhere") is None


def test_an_evaluation_run_holds_the_report_numbers_inputs_and_files(tracking, tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    report = {
        "inputs": {"queries": "q.parquet", "config": {"ks": [1, 5, 10]}},
        "model_version": "m1",
        "index_version": 3,
        "recall@1": 0.8,
        "exact": {"recall@1": 0.85},
        "per_category": {"toys": {"recall@1": 0.5, "queries": 4}},
        "n_queries": 40,
        "curves": {"ann": [0.8, 0.9]},
    }
    (eval_dir / "report.json").write_text(json.dumps(report))
    (eval_dir / "report.html").write_text("<html>report</html>")
    run_id = record_evaluation(tracking, report, str(eval_dir))
    client = MlflowClient(tracking.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "evaluate"
    assert run.data.metrics == {
        "recall_at_1": 0.8,
        "exact.recall_at_1": 0.85,
        "per_category.toys.recall_at_1": 0.5,
        "per_category.toys.queries": 4.0,
        "n_queries": 40.0,
    }
    params = run.data.params
    assert params["queries"] == "q.parquet" and params["config.ks"] == "[1, 5, 10]"
    assert params["model_version"] == "m1" and params["index_version"] == "3"
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["report.html", "report.json"]
    local = client.download_artifacts(run_id, "report.html", str(tmp_path / "back"))
    assert Path(local).read_text() == "<html>report</html>"
