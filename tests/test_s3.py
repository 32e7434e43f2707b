"""Shared storage for real: the storage layer, the model export, the whole pipeline (governance
in ``auto`` mode, its probe trainings deciding the class map), search and serving on ``s3://``
against a real S3-protocol server (moto's, ``tests/s3_server.py``), a training worker killed
mid-run resuming from its S3 checkpoint, and an S3 outage in the middle of an embedding job."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from oclear_ray import storage
from oclear_ray.cli import _start_app, _stop_app, app
from oclear_ray.demo import first_query, search_over_http, wait_ready
from oclear_ray.embed import EmbedConfig, embed_catalog, read_parts, read_summary, summary_parts
from oclear_ray.export import load_query_encoder
from oclear_ray.pipeline import read_stamp
from oclear_ray.serve import Paths, check_versions
from oclear_ray.synth import SynthConfig, generate
from tests.helpers import train_worker_pids
from tests.test_pipeline import TINY, stage_statuses
from tests.tiny import export_random_model

IMAGE_PATH_ROWS = 30  # catalog rows whose image is an s3:// object rather than bytes


def test_storage_on_s3_writes_whole_files_and_lists_uris(s3_server):
    root = s3_server.bucket("oclear-unit") + "/w"
    storage.write_bytes(storage.join(root, "b", "x.json"), b"{}")
    storage.write_parquet(storage.join(root, "a.parquet"), [pa.table({"v": [1, 2]})], None)
    assert storage.list_files(root, (".json", ".parquet")) == [
        "s3://oclear-unit/w/a.parquet",
        "s3://oclear-unit/w/b/x.json",
    ]  # no temporary names left behind
    assert storage.read_bytes(f"{root}/b/x.json") == b"{}" and storage.is_dir(f"{root}/b")
    fs, p = storage.resolve(f"{root}/a.parquet")
    assert pq.read_table(p, filesystem=fs).column("v").to_pylist() == [1, 2]
    assert storage.basename(f"{root}/b/") == "b" and not storage.exists(f"{root}/c")
    with pytest.raises(FileNotFoundError, match="s3://oclear-unit/w/nothing.json"):
        storage.read_bytes(f"{root}/nothing.json")


def test_export_publishes_file_by_file_manifest_last_and_loads_from_s3(
    s3_server, tmp_path, monkeypatch
):
    local, dest = tmp_path / "model", s3_server.bucket("oclear-export") + "/model"
    version = export_random_model(["red mug", "blue cap"], local)
    written, open_output = [], storage.open_output
    monkeypatch.setattr(
        storage, "open_output", lambda path: written.append(path) or open_output(path)
    )
    storage.publish_dir(str(local), dest, manifest="config.json")
    assert sorted(written) == sorted(f"{dest}/{n}" for n in os.listdir(local))
    assert written[-1] == f"{dest}/config.json"
    assert load_query_encoder(dest).model_version == version
    doc = storage.read_bytes(f"{dest}/doc_encoder.safetensors")
    storage.write_bytes(f"{dest}/query_encoder.safetensors", doc)  # not what config.json names
    with pytest.raises(ValueError, match="mixed or partial export"):
        load_query_encoder(dest)


# ---------------------------------------------------------------- the pipeline on S3 (Ray)


def _s3_inputs(server, local) -> dict:
    """The synthetic catalog as an s3:// folder of two parquet files, its first rows' images
    as s3:// objects (``image_path``) plus one row naming a missing object; the queries on s3."""
    bucket = server.bucket("oclear-e2e")
    table = pq.read_table(local / "catalog.parquet")
    images, paths = table.column("image").to_pylist(), []
    for i, doc_id in enumerate(table.column("doc_id").to_pylist()):
        if i < IMAGE_PATH_ROWS:
            paths.append(f"{bucket}/images/{doc_id}.png")
            storage.write_bytes(paths[-1], images[i])
            images[i] = None
        else:
            paths.append(None)
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images))
    table = table.append_column("image_path", pa.array(paths, pa.string()))
    missing = table.slice(0, 1).to_pylist()[0] | {
        "doc_id": "missing-image",
        "image_path": f"{bucket}/images/missing.png",
    }
    table = pa.concat_tables([table, pa.Table.from_pylist([missing], schema=table.schema)])
    half = table.num_rows // 2
    for i, part in enumerate((table.slice(0, half), table.slice(half))):
        storage.write_parquet(f"{bucket}/catalog/part-{i}.parquet", [part], part.schema)
    uris = {"catalog": f"{bucket}/catalog", "workdir": f"{bucket}/run"}
    for name in ("queries", "eval_queries"):
        uris[name] = f"{bucket}/{name}.parquet"
        storage.write_bytes(uris[name], (local / f"{name}.parquet").read_bytes())
    return uris


def _kill_a_worker_after_an_s3_checkpoint(runs: str, stop: threading.Event, killed: list):
    """Once Ray Train has registered a checkpoint under ``runs`` (on S3), SIGKILL one worker."""
    while not stop.is_set():
        try:
            snapshots = storage.list_files(runs, ("checkpoint_manager_snapshot.json",))
            done = any(
                json.loads(storage.read_bytes(s)).get("latest_checkpoint_result") for s in snapshots
            )
        except (OSError, ValueError):
            done = False
        pids = train_worker_pids() if done else []
        if pids:
            os.kill(pids[0], 9)
            killed.append(pids[0])
            return
        time.sleep(1.0)


@pytest.fixture(scope="module")
def s3_pipeline(ray_cluster, s3_server, tmp_path_factory):
    """``oclear pipeline`` with catalog, queries and work directory on s3://, run from an
    empty directory (nothing may land on local disk), governance in ``auto`` mode (two probe
    trainings decide whether training applies the class map), one training worker killed after
    the first checkpoint."""
    local = tmp_path_factory.mktemp("s3-data")
    generate(local, SynthConfig(docs=150, classes=20, noise=0.1, seed=0))
    uris = _s3_inputs(s3_server, local)
    config = TINY | {
        "schedule": [
            {"name": "align", "steps": 4, "towers": "image"},
            {"name": "fuse", "steps": 8},
        ],
        "run": {"workers": 1, "checkpoint_every": 4, "log_every": 4, "max_failures": 2},
    }
    (local / "tiny.yaml").write_text(yaml.safe_dump(config))
    args = ["pipeline", "--config", str(local / "tiny.yaml"), "--govern", "auto"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in uris.items()]
    cwd, stop, killed = os.getcwd(), threading.Event(), []
    killer = threading.Thread(
        target=_kill_a_worker_after_an_s3_checkpoint,
        args=(f"{uris['workdir']}/train/runs", stop, killed),
    )
    run_dir = tmp_path_factory.mktemp("cwd")
    os.chdir(run_dir)
    killer.start()
    started = time.monotonic()
    try:
        result = CliRunner().invoke(app, args)
    finally:
        stop.set()
        killer.join()
        os.chdir(cwd)
    seconds = time.monotonic() - started
    return {"local": local, "uris": uris, "result": result, "killed": killed, "cwd": run_dir,
            "seconds": seconds}  # fmt: skip


@pytest.mark.ray
def test_pipeline_on_s3_runs_every_stage_and_resumes_training_from_s3(s3_pipeline):
    result, w = s3_pipeline["result"], s3_pipeline["uris"]["workdir"]
    assert result.exit_code == 0, result.output
    statuses = stage_statuses(result.output)
    assert statuses == dict.fromkeys(("govern", "train", "embed", "index", "evaluate"), "done")
    assert os.listdir(s3_pipeline["cwd"]) == []  # every artifact went to S3
    assert s3_pipeline["killed"], "no worker was killed: training ended before a checkpoint"
    runs = f"{w}/train/runs"
    (snapshot,) = storage.list_files(runs, ("checkpoint_manager_snapshot.json",))
    metrics = json.loads(storage.read_bytes(snapshot))["latest_checkpoint_result"]["metrics"]
    assert metrics["step"] == 12 and metrics["resumed_from"] >= 4  # from the S3 checkpoint
    assert storage.list_files(runs, (".distcp",))  # checkpoints live on S3
    quarantine = storage.read_bytes(f"{w}/quarantine/catalog.parquet")
    bad = pq.read_table(pa.BufferReader(quarantine)).to_pylist()
    assert [r["doc_id"] for r in bad] == ["missing-image"]
    assert bad[0]["reason"].startswith("unreadable image_path: FileNotFoundError")
    assert read_summary(f"{w}/embed")["rows"] == 150  # the image_path rows included
    report = json.loads(storage.read_bytes(f"{w}/eval/report.json"))
    assert report["n_documents"] == 150 and report["n_queries"] > 0
    print(f"S3 pipeline: {s3_pipeline['seconds']:.0f} s")


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


@pytest.mark.ray
def test_auto_governance_applies_the_map_only_when_its_probe_scores_higher(s3_pipeline):
    """``--govern auto`` (the S3 pipeline's): governance runs two probe trainings on held-out
    training-query classes, and training uses the class map exactly when the probe on it
    scored higher."""
    result, w = s3_pipeline["result"], s3_pipeline["uris"]["workdir"]
    assert result.exit_code == 0, result.output
    assert stage_statuses(result.output)["govern"] == "done"
    choice = read_stamp(w, "govern")["output"]["choice"]
    assert choice["mode"] == "auto" and sum(choice["changes"].values()) > 0
    raw, governed = choice["validation"]["raw"], choice["validation"]["governed"]
    assert raw["queries"] == governed["queries"] > 0
    assert 0.0 <= raw["recall@1"] <= 1.0 and 0.0 <= governed["recall@1"] <= 1.0
    assert choice["apply"] == (governed["recall@1"] > raw["recall@1"])
    assert read_json(f"{w}/govern/report.json")["choice"] == choice
    proposed = read_json(f"{w}/govern/class_map.json")["version"]
    used = read_json(f"{w}/train/model/class_map.json")["version"]
    assert (used == proposed) == choice["apply"]


@pytest.mark.ray
def test_search_and_serve_from_the_s3_workdir(s3_pipeline, tmp_path):
    w = s3_pipeline["uris"]["workdir"]
    query = first_query(str(s3_pipeline["local"] / "eval_queries.parquet"))
    photo = tmp_path / "photo.png"
    photo.write_bytes(query["image"])
    out = CliRunner().invoke(app, ["search", str(photo), "--workdir", w, "--k", "3"])
    assert out.exit_code == 0, out.output
    assert str(photo) in out.output and out.output.count(" d0") >= 3
    check_versions(Paths.of(w, None))  # what `oclear serve` checks before it starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = _start_app(w, None, "127.0.0.1", port)
    try:
        wait_ready(url)
        hits = search_over_http(url, query["image"], k=3)
    finally:
        _stop_app()
    assert len(hits) == 3 and all(h["doc_id"].startswith("d0") for h in hits)


@pytest.mark.ray
def test_s3_outage_mid_embedding_names_the_uri_and_the_rerun_resumes(s3_pipeline, s3_server):
    """The server stopped after the first part: an error naming the part's URI; started again,
    the same call embeds the rest, each id once, with the vectors of an uninterrupted run."""
    w, local = s3_pipeline["uris"]["workdir"], s3_pipeline["local"]
    outage, catalog = f"{w}-outage", str(local / "catalog.parquet")
    config, parts = EmbedConfig(batch_size=20, rows_per_part=40), []

    def stop_the_server(rows):
        parts.append(rows)
        if len(parts) == 1:
            s3_server.stop()

    args = {"model_dir": f"{w}/train/model", "config": config}
    try:
        with pytest.raises(storage.StorageError, match=f"{outage}/embed/part-00001.parquet"):
            embed_catalog(catalog, outage, progress=stop_the_server, **args)
    finally:
        s3_server.start()
    resumed = embed_catalog(catalog, outage, **args)
    assert (resumed.embedded, resumed.rows) == (150 - 40, 150)
    got = read_parts(summary_parts(f"{outage}/embed", read_summary(f"{outage}/embed")))
    ids = got.column("doc_id").to_pylist()
    assert len(ids) == len(set(ids)) == 150
    ref = read_parts(summary_parts(f"{w}/embed", read_summary(f"{w}/embed")))
    order = {d: i for i, d in enumerate(ref.column("doc_id").to_pylist())}
    ref_vectors = np.stack(ref.column("vector").to_numpy(zero_copy_only=False))
    vectors = np.stack(got.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(vectors, ref_vectors[[order[d] for d in ids]], atol=1e-5)
