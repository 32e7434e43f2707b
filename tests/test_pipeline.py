"""The product a new user meets: ``oclear demo`` (synth -> pipeline -> serve -> one search) on a
local Ray (the session's one demo run, tests/conftest.py), then ``oclear pipeline`` on the same
inputs skipping every current stage and rerunning only what a changed input touches. (``--govern
auto`` and its probe trainings are checked on the S3 pipeline's run, tests/test_s3.py.)"""

import json
import os

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from oclear_ray.cli import app
from oclear_ray.pipeline import read_stamp
from oclear_ray.views import setting_key
from tests.tiny import TINY_MODEL

pytestmark = pytest.mark.ray

#: a tiny pipeline config (tests/test_s3.py runs its pipeline on it)
TINY = {
    "model": TINY_MODEL,
    "data": {"batch_size": 8, "query_batch_size": 4, "doc_as_query_rate": 0.0},
    "schedule": [{"name": "align", "steps": 2, "towers": "image"}, {"name": "fuse", "steps": 2}],
    "run": {"workers": 1, "checkpoint_every": 100},
}


@pytest.fixture(scope="module")
def demo(demo_run):
    """``oclear demo`` with a relative work directory, as a user runs it: the session's one
    demo run (tests/conftest.py), which tests/test_pretrained checks too."""
    return demo_run.workdir, demo_run.config, demo_run.result


def read_report(workdir: str) -> dict:
    with open(os.path.join(workdir, "eval", "report.json")) as f:
        return json.load(f)


def stage_statuses(output: str) -> dict:
    """``stage: status`` lines the pipeline logs."""
    found = {}
    for line in output.splitlines():
        stage, _, rest = line.partition(": ")
        if stage in ("govern", "train", "embed", "index", "evaluate") and rest:
            found[stage] = rest.split()[0]
    return found


def test_demo_runs_every_stage_and_answers_a_search_over_http(demo):
    workdir, _, result = demo
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert stage_statuses(result.output) == dict.fromkeys(
        ("govern", "train", "embed", "index", "evaluate"), "done"
    )
    assert "search page: http://127.0.0.1:" in result.output
    report = read_report(workdir)
    good = pq.read_metadata(os.path.join(workdir, "data", "eval_queries.parquet")).num_rows
    assert report["n_queries"] == good and 0.0 <= report["recall@1"] <= 1.0
    index = read_stamp(workdir, "index")["output"]
    assert (
        index["count"]
        == pq.read_metadata(os.path.join(workdir, "data", "catalog.parquet")).num_rows
    )


def read_json(*parts: str) -> dict:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_demo_evaluates_new_photos_beside_held_out_classes_and_tracks_its_runs(demo):
    """The pipeline evaluates new photos of catalog products, the held-out-class figure is
    beside it, the served search is a new photo judged by the product it shows, and the
    training and both evaluations are MLflow runs in WORKDIR/mlflow."""
    from mlflow import MlflowClient

    from oclear_ray.tracking import tracking_for

    workdir, _, result = demo
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = os.path.join(workdir, "data")
    photos = pq.read_table(os.path.join(data, "new_photos.parquet"))
    held_out = pq.read_metadata(os.path.join(data, "eval_queries.parquet")).num_rows
    new, held = read_report(workdir), read_json(workdir, "eval-held-out", "report.json")
    assert (new["n_queries"], held["n_queries"]) == (photos.num_rows, held_out)
    output = " ".join(result.output.split())  # rich may wrap the line
    assert f"R@1 {new['recall@1']:.3f} on {photos.num_rows} new photos of catalog" in output
    assert f"R@1 {held['recall@1']:.3f} on {held_out} photos of products never" in output

    # the document view was chosen on held-out training photos, recorded alike everywhere
    views = read_stamp(workdir, "train")["output"]["views"]
    manifest = read_json(workdir, "train", "model", "config.json")
    assert views["held_out_by"] == "photo" and views["queries"] > 0
    assert set(views["recall@1"]) == {
        f"{view}@{setting}"
        for view in ("fused", "image_only")
        for setting in ("1:grey", "2:grey", "4:grey", "1:ink", "2:ink", "4:ink", "0")
    }
    assert manifest["view_choice"] == views == new["view_choice"] == held["view_choice"]
    assert manifest["doc_view"] == new["doc_view"] == views["doc_view"]
    assert manifest["model"]["shape"]["weight"] == views["shape_weight"]
    if views["shape_weight"]:
        assert manifest["model"]["shape"]["levels"] == views["shape_levels"]
    chosen = setting_key(views["doc_view"], views["shape_weight"], views["shape_levels"])
    best = max(v for k, v in views["recall@1"].items() if k.startswith(views["doc_view"]))
    assert views["recall@1"][chosen] == best

    truth, shown = read_json(data, "truth.json"), read_json(data, "new_photos.json")
    trained = pq.read_table(os.path.join(data, "queries.parquet")).column("query_id")
    assert set(shown.values()) == {truth["query_product"][q] for q in trained.to_pylist()}

    # both evaluations count a hit by the product the photo shows, not by the noisy labels
    assert new["relevance"] == held["relevance"] == "judgments"
    assert "a hit is a document of the photographed product" in output
    judged = read_json(data, "new_photos_judgments.json")
    assert set(judged) == set(shown)
    for query, docs in judged.items():
        assert docs and {truth["doc_product"][d] for d in docs} == {shown[query]}
    assert sum(len(d) for d in judged.values()) == sum(
        1 for q in shown for p in truth["doc_product"].values() if p == shown[q]
    )
    top = output.split("top hit ")[1].split()[0]
    photographed = shown[photos.column("query_id")[0].as_py()]
    verdict = "is" if truth["doc_product"][top] == photographed else "is not"
    assert f"top hit {top} {verdict} the photographed product" in output

    client = MlflowClient(tracking_for(workdir).uri)
    experiment = client.get_experiment_by_name("oclear").experiment_id
    runs = {}
    for run in client.search_runs([experiment]):
        runs.setdefault(run.info.run_name, []).append(run)
    (train,), evaluations = runs["train"], runs["evaluate"]
    version = read_json(workdir, "train", "model", "config.json")["model_version"]
    assert train.info.status == "FINISHED" and train.data.tags["model_version"] == version
    assert train.data.params["config.run.workers"] == "2"
    assert train.data.params["config.data.batch_size"] == "8"
    losses = client.get_metric_history(train.info.run_id, "loss")
    # --steps 4 scales the recipe's 5,000 + 45,000 steps to 1 + 4 (each stage keeps >= 1): 5
    # steps (log_every 10), the last one's report
    assert [m.step for m in losses] == [5]
    recalls = sorted(r.data.metrics["recall_at_1"] for r in evaluations)
    assert recalls == sorted([new["recall@1"], held["recall@1"]])
    for run in evaluations:
        assert run.data.tags["model_version"] == version
        artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
        assert artifacts == ["report.html", "report.json"]


def test_pipeline_rerun_skips_current_stages_and_reruns_what_changed(demo):
    workdir, config, first = demo
    assert first.exit_code == 0
    data = os.path.join(workdir, "data")
    args = [
        "pipeline",
        "--catalog",
        os.path.join(data, "catalog.parquet"),
        "--queries",
        os.path.join(data, "queries.parquet"),
        "--eval-queries",
        os.path.join(data, "new_photos.parquet"),  # what the demo evaluates
        "--eval-judgments",
        os.path.join(data, "new_photos_judgments.json"),  # and how it counts a hit
        "--workdir",
        workdir,
        "--config",
        config,
        "--steps",
        "4",
        "--max-minutes",
        "4",  # the demo's budget, a cap beside --steps
        "--govern",
        "apply",  # as the demo runs it
        "--views",
        "photo",  # as the demo runs it
    ]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert set(stage_statuses(again.output).values()) == {"current"}

    # new evaluation queries (the first half): only the evaluation reruns
    table = pq.read_table(os.path.join(data, "new_photos.parquet"))
    half = os.path.join(data, "eval_half.parquet")
    pq.write_table(table.slice(0, table.num_rows // 2), half)
    args[args.index("--eval-queries") + 1] = half
    changed = CliRunner().invoke(app, args)
    assert changed.exit_code == 0, changed.output
    statuses = stage_statuses(changed.output)
    assert statuses.pop("evaluate") == "done"
    assert set(statuses.values()) == {"current"}
    report = read_report(workdir)
    assert report["n_queries"] == table.num_rows // 2
