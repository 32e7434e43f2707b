"""Catalog -> embeddings -> FAISS shards -> search, end to end on a local Ray; the device and
precision the encoder actors run in."""

import contextlib
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from oclear_ray import export
from oclear_ray.cli import app
from oclear_ray.config import ModelConfig
from oclear_ray.embed import (
    DocEmbedder,
    EmbedConfig,
    _actor_resources,
    embed_catalog,
    list_parts,
    read_parts,
    vectors_of,
)
from oclear_ray.export import export_model, inference_autocast, load_query_encoder
from oclear_ray.index import IndexConfig, sync_index
from oclear_ray.model import RetrievalModel
from oclear_ray.search import SearchIndex
from oclear_ray.synth import SynthConfig, generate
from oclear_ray.text import train_tokenizer
from tests.helpers import catalog_model

pytestmark = pytest.mark.ray

CONFIG = EmbedConfig(batch_size=16, rows_per_part=32)  # 120 good rows -> 4 parts


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A synthetic catalog plus two bad rows: a duplicate id and an undecodable image."""
    root = tmp_path_factory.mktemp("data")
    generate(str(root), SynthConfig(docs=120, classes=30, seed=0))
    table = pq.read_table(root / "catalog.parquet")
    bad = table.slice(0, 2).to_pylist()
    bad[0]["image"] = table.column("image")[5].as_py()  # same id as row 0, another image
    bad[1].update(doc_id="broken", image=b"\x89PNG not really")
    full = pa.concat_tables([table, pa.Table.from_pylist(bad, schema=table.schema)])
    pq.write_table(full, root / "full.parquet")
    return str(root / "full.parquet"), table.column("doc_id").to_pylist()


@pytest.fixture(scope="module")
def model_dir(catalog, tmp_path_factory):
    """A small random-init model exported the way training exports it."""
    return catalog_model(catalog[0], tmp_path_factory.mktemp("model"))


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def resumed(ray_cluster, catalog, model_dir, tmp_path_factory):
    """An embedding run killed after two parts, then run again to the end."""
    workdir, calls = tmp_path_factory.mktemp("work"), []

    def die_after_two_parts(rows):
        calls.append(rows)
        if len(calls) == 2:
            raise Killed

    with pytest.raises(Killed):
        embed_catalog(
            catalog[0],
            str(workdir),
            model_dir=model_dir,
            config=CONFIG,
            progress=die_after_two_parts,
        )
    killed = {
        "parts": len(list_parts(str(workdir / "embed"))),
        "summary": (workdir / "embed" / "embed.json").exists(),
    }
    result = embed_catalog(catalog[0], str(workdir), model_dir=model_dir, config=CONFIG)
    return workdir, killed, result


def reference(catalog, model_dir) -> dict:
    """The same encoder class run in this process over the good rows: no Ray."""
    table = pq.read_table(catalog[0]).slice(0, 120)  # the synthetic rows; the 2 bad ones last
    table = table.append_column("image_path", pa.nulls(120, pa.string()))
    vectors = vectors_of(DocEmbedder(model_dir, threads=1)(table))
    return dict(zip(table.column("doc_id").to_pylist(), vectors, strict=True))


def embeddings(workdir) -> dict:
    table = read_parts(list_parts(str(workdir / "embed")))
    assert len(set(table.column("doc_id").to_pylist())) == table.num_rows  # no duplicates
    return dict(zip(table.column("doc_id").to_pylist(), vectors_of(table), strict=True))


def test_actors_take_a_gpu_when_asked():
    assert _actor_resources(EmbedConfig(use_gpu=True, cpus_per_actor=2)) == (
        {"num_gpus": 1, "num_cpus": 2},
        "cuda",
    )
    assert _actor_resources(EmbedConfig(use_gpu=False)) == ({"num_cpus": 1.0}, "cpu")


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_inference_autocast_is_half_precision_on_cuda_only(monkeypatch, bf16, dtype):
    assert isinstance(inference_autocast("cpu"), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    with warnings.catch_warnings():  # without CUDA torch warns that it disables autocast
        warnings.simplefilter("ignore")
        for device in ("cuda", torch.device("cuda", 0)):
            context = inference_autocast(device)
            assert (context.device, context.fast_dtype) == ("cuda", dtype)


def test_doc_embedder_runs_under_its_devices_autocast_and_returns_float32(
    catalog, model_dir, monkeypatch
):
    table = pq.read_table(catalog[0]).slice(0, 16)
    want = vectors_of(DocEmbedder(model_dir, threads=1)(table))
    devices = []

    def half(device):  # what CUDA gets, in CPU autocast: bf16 matmuls here
        devices.append(device)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(export, "inference_autocast", half)
    rows = DocEmbedder(model_dir, threads=1)(table)
    got = vectors_of(rows)
    assert (
        devices == [torch.device("cpu")]
        and rows.schema.field("vector").type.value_type == pa.float32()
    )
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(got, want)


def test_killed_embedding_resumes_to_the_uninterrupted_result(resumed, catalog, model_dir):
    workdir, killed, result = resumed
    assert killed == {"parts": 2, "summary": False}
    assert result.validation["rows"] == 122 and result.validation["quarantined"] == 2
    assert result.embedded == 120 - 64 and result.skipped == 64
    assert result.rows == 120 and result.parts == 4
    got, want = embeddings(workdir), reference(catalog, model_dir)
    assert sorted(got) == sorted(want) == sorted(catalog[1])
    for doc_id, vector in want.items():
        np.testing.assert_allclose(got[doc_id], vector, atol=1e-5)


def test_three_shards_index_every_good_row_once(resumed, catalog, model_dir):
    workdir = resumed[0]
    index = sync_index(str(workdir), IndexConfig(shards=3)).manifest
    assert index["count"] == 120 and len(index["shards"]) == 3
    assert sum(s["vectors"] for s in index["shards"]) == 120
    encoder = load_query_encoder(model_dir)
    found = SearchIndex.load(str(workdir / "index"), expected_model_version=encoder.model_version)
    ids = found.documents.column("doc_id").to_pylist()
    assert sorted(ids) == sorted(catalog[1]) and len(set(found.documents["id"].to_pylist())) == 120
    image = pq.read_table(catalog[0]).column("image")[7].as_py()
    hits = found.search_documents(encoder.encode_query(images=[image]).numpy(), k=5)[0]
    assert len(hits) == 5 and {"doc_id", "text", "category", "label", "price"} <= set(hits[0])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_search_command_prints_documents(resumed, catalog, model_dir, tmp_path):
    workdir = resumed[0]
    if not (workdir / "index" / "manifest.json").exists():
        sync_index(str(workdir), IndexConfig(shards=3))
    photo = tmp_path / "photo.png"
    photo.write_bytes(pq.read_table(catalog[0]).column("image")[3].as_py())
    args = ["search", str(photo), "--workdir", str(workdir), "--model-dir", model_dir, "--k", "3"]
    out = CliRunner().invoke(app, [*args, "--text", "red teapot"])
    assert out.exit_code == 0, out.output
    assert str(photo) in out.output and out.output.count(" d0") >= 3
    other = tmp_path / "other-model"
    export_model(
        RetrievalModel(ModelConfig(embed_dim=32)).eval(),
        train_tokenizer(["a b c"], vocab_size=50),
        other,
    )
    refused = CliRunner().invoke(app, [*args[:4], "--model-dir", str(other)])
    assert refused.exit_code == 2 and "index built with model version" in refused.output
