"""The train stage: the step's inputs and loss (no Ray), then end to end on a local Ray: FSDP2 +
sharded head on 2 workers, then a resume of that run with 1 worker; a time budget filled."""

import dataclasses
import time

import numpy as np
import pytest
import torch
from PIL import Image

from oclear_ray.classifier import ClassifierConfig, ShardedMarginSoftmax
from oclear_ray.config import TrainConfig
from oclear_ray.export import load_doc_encoder, load_query_encoder
from oclear_ray.ingest import augment_docs, outline_view
from oclear_ray.model import RetrievalModel
from oclear_ray.synth import SynthConfig, generate
from oclear_ray.train import _make_batch, fit, train_step
from tests.tiny import TINY_MODEL

B, T = 3, 6


@pytest.fixture(scope="module")
def step_inputs():
    """A small model (eval mode: no dropout), a 3-class head and one worker's raw batch."""
    torch.manual_seed(0)
    cfg = TrainConfig.from_dict(
        {"model": {**TINY_MODEL, "text": {**TINY_MODEL["text"], "vocab_size": 50}}}
    )
    model = RetrievalModel(cfg.model).eval()
    head = ShardedMarginSoftmax(ClassifierConfig(num_classes=3, dim=cfg.model.embed_dim))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1] = 0  # no text
    mask[2, 3:] = 0
    pad = torch.zeros(B, 10, dtype=torch.long)  # every row padded past the longest text
    docs = {
        "image": torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8, generator=gen),
        "input_ids": torch.cat([ids * mask, pad], 1),
        "attention_mask": torch.cat([mask, pad], 1),
        "label": torch.tensor([0, 1, 2]),
        "has_query_image": torch.tensor([True, False, True]),
        "query_image": torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8, generator=gen),
    }
    return model, head, docs, mask


@torch.no_grad()
def test_a_batch_drops_padding_columns_and_the_loss_stays(step_inputs):
    model, head, docs, mask = step_inputs
    batch = _make_batch(docs, None, model.config.preprocess, torch.device("cpu"))
    assert batch.doc_ids.shape == (B, T) and torch.equal(batch.doc_mask, mask)
    assert batch.query_images.shape[0] == 2  # the documents' own query views
    padded = dataclasses.replace(batch, doc_ids=docs["input_ids"], doc_mask=docs["attention_mask"])
    for towers in ("image", "all"):
        torch.testing.assert_close(
            train_step(model, head, batch, towers=towers),
            train_step(model, head, padded, towers=towers),
        )


@torch.no_grad()
def test_text_weight_adds_the_text_rows_loss_to_the_image_rows_loss(step_inputs):
    model, head, docs, _ = step_inputs
    batch = _make_batch(docs, None, model.config.preprocess, torch.device("cpu"))
    image = train_step(model, head, batch, towers="image")
    torch.testing.assert_close(train_step(model, head, batch, towers="all", text_weight=0.0), image)
    half = train_step(model, head, batch, towers="all", text_weight=0.5)
    one = train_step(model, head, batch, towers="all", text_weight=1.0)
    torch.testing.assert_close(one - image, 2 * (half - image))
    assert (one - image) > 0  # the text rows' loss is a positive cross-entropy
    pooled = train_step(model, head, batch, towers="all")  # one softmax: a mean over all rows
    assert not torch.isclose(pooled, one)


def test_outline_view_draws_the_dark_lines_black_on_white():
    img = np.full((32, 32, 3), 255, np.uint8)
    img[4:28, 4:28] = (250, 200, 0)  # a yellow square ...
    img[4:28, 4:6] = img[4:28, 26:28] = 0  # ... with black left and right edges
    img[14:18, 14:18] = (0, 0, 140)  # ... and a dark blue spot: colour, not ink
    out = np.asarray(outline_view(Image.fromarray(img)))
    assert out.shape == img.shape
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()  # grey
    ink = out[..., 0] < 128
    assert ink[:, :16].any() and ink[:, 16:].any()  # both edges drawn
    assert (out[8:24, 10:22] > 130).all()  # the colour fill and the blue spot are paper
    assert (out[8:24, 10:22] > 240).sum() > 0.8 * 16 * 12


def test_augment_docs_adds_outline_query_views():
    pixels = np.zeros((8, 16, 16, 3), np.uint8)
    pixels[:, 4:12, 4:12] = 255
    batch = {"image": pixels.copy(), "label": np.arange(8)}
    out = augment_docs(batch, augment=False, doc_as_query_rate=1.0, view="outline")
    assert out["has_query_image"].all() and np.array_equal(out["image"], pixels)
    views = out["query_image"]
    assert views.shape == pixels.shape and (views[..., 0] == views[..., 2]).all()
    assert (views < 128).any() and (views > 200).any()  # lines on paper
    none = augment_docs(dict(batch), augment=False, doc_as_query_rate=0.0, view="outline")
    assert not none["has_query_image"].any() and not none["query_image"].any()


def small_config(*, workers: int, fuse_steps: int) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": TINY_MODEL,
            "data": {"batch_size": 8, "query_batch_size": 4, "doc_as_query_rate": 0.0},
            "schedule": [
                {"name": "align", "steps": 4, "towers": "image"},
                {"name": "fuse", "steps": fuse_steps},
            ],
            "run": {"workers": workers, "checkpoint_every": 4, "log_every": 4, "max_failures": 2},
        }
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A synthetic catalog and query photos for the module's trainings, and one folder for
    their clean copies (``fit(cache=)``): each input is checked once for the module."""
    root = tmp_path_factory.mktemp("train-inputs")
    generate(root / "data", SynthConfig(docs=160, classes=24, queries_per_class=2, seed=3))
    return root / "data", str(root / "clean")


@pytest.mark.ray
@pytest.mark.slow
def test_train_resumes_a_two_worker_checkpoint_with_one_worker(ray_cluster, inputs, tmp_path):
    """A 2-worker run (FSDP2 + sharded head), then the same run resumed with 1 worker and more
    steps: the sharded checkpoint loads whole. (A worker killed mid-run and recovered from its
    checkpoint: tests/test_s3.py.)"""
    data, cache = inputs
    workdir = str(tmp_path / "work")

    def train(workers: int, fuse_steps: int):
        catalog, queries = str(data / "catalog.parquet"), str(data / "queries.parquet")
        cfg = small_config(workers=workers, fuse_steps=fuse_steps)
        return fit(cfg, catalog=catalog, queries=queries, workdir=workdir, cache=cache)

    first = train(workers=2, fuse_steps=16)
    assert (first.metrics["step"], first.metrics["resumed_from"]) == (20, 0)
    assert first.num_classes == 24 + 0  # synth labels: classes + aliases - broad pairs
    doc = load_doc_encoder(first.model_dir)
    version = doc.model_version

    second = train(workers=1, fuse_steps=24)
    assert second.metrics["resumed_from"] == 20  # the 2-worker checkpoint, loaded by 1 worker
    assert second.metrics["step"] == 28
    query = load_query_encoder(second.model_dir)
    assert query.model_version != version
    emb = query.encode_query(images=[_first_image(data).read_bytes()])
    assert emb.shape == (1, 32 + 575)  # the learned part and the default shape code


@pytest.mark.ray
def test_a_time_budget_is_filled_at_one_step_boundary(ray_cluster, inputs, tmp_path):
    """schedule_by time: a schedule of 10,004 steps in a 15 s budget ends when the time does,
    at the end of its last stage with the learning rate decayed (progress 1), both workers at
    the same step, with time left to export."""
    data, cache = inputs
    cfg = small_config(workers=2, fuse_steps=10_000)
    run = dataclasses.replace(cfg.run, max_minutes=0.25, schedule_by="time", log_every=50)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(run, checkpoint_every=100_000))
    started = time.monotonic()
    catalog = str(data / "catalog.parquet")
    result = fit(cfg, catalog=catalog, workdir=str(tmp_path / "w"), cache=cache)
    took = time.monotonic() - started
    assert 1 <= result.steps == result.metrics["step"] < cfg.total_steps, result.metrics
    assert result.metrics["progress"] == 1.0 and result.metrics["stage"] == "fuse"
    assert took < 15 + 60  # the budget, then the export
    assert load_query_encoder(result.model_dir).model_version


def _first_image(data):
    import pyarrow.parquet as pq

    row = pq.read_table(data / "catalog.parquet").slice(0, 1).to_pylist()[0]
    path = data / "first.png"
    path.write_bytes(row["image"])
    return path


def test_photo_views_are_torchvision_draws_of_the_strength_asked():
    """strength 0 keeps the image; a full-strength view changes it, differently per call (the
    draws are seeded per batch, not repeated in every worker process)."""
    from oclear_ray.ingest import augment_queries

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    same = augment_queries({"image": img.copy()}, augment=True, strength=0.0)["image"]
    np.testing.assert_array_equal(same, img)
    a = augment_queries({"image": img.copy()}, augment=True, strength=1.0)["image"]
    b = augment_queries({"image": img.copy()}, augment=True, strength=1.0)["image"]
    assert a.shape == img.shape and a.dtype == np.uint8
    assert not np.array_equal(a, img) and not np.array_equal(a, b)
