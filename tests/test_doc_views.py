"""The document view and shape code chosen on held-out training queries (no Ray):
``pipeline.held_out``, ``pipeline.choose_views``, ``export.revise`` and the embedders that
follow the export's view."""

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from oclear_ray.classmap import raw_class_map
from oclear_ray.config import ModelConfig, PreprocessConfig, ShapeConfig, TextEncoderConfig
from oclear_ray.embed import DocEmbedder, embedding_version
from oclear_ray.evaluate import embed_in_process
from oclear_ray.export import export_model, load_doc_encoder, read_manifest, revise
from oclear_ray.model import RetrievalModel
from oclear_ray.text import train_tokenizer
from oclear_ray.views import (
    Split,
    choose_views,
    distinct,
    held_out,
    pick_setting,
    setting_key,
    validation_recall,
)

LABELS = ["mug", "cup", "bottle", "bag"]


def _png(rng) -> bytes:
    pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data():
    """A catalog of 16 documents in 4 classes and 8 photos (other draws of the same classes)."""
    rng = np.random.default_rng(0)
    labels = [LABELS[i % 4] for i in range(16)]
    docs = pa.table(
        {
            "doc_id": [f"d{i}" for i in range(16)],
            "image": [_png(rng) for _ in range(16)],
            "text": [f"a {v} number {i}" for i, v in enumerate(labels)],
            "label": labels,
        }
    )
    val = pa.table(
        {
            "query_id": [f"q{i}" for i in range(8)],
            "image": [_png(rng) for _ in range(8)],
            "label": [LABELS[i % 4] for i in range(8)],
        }
    )
    return docs, val


@pytest.fixture
def model_dir(data, tmp_path):
    """A random-init model with a 4 x 4 shape code at weight 2, exported with its class map."""
    tok = train_tokenizer(data[0].column("text").to_pylist(), vocab_size=100)
    torch.manual_seed(0)
    config = ModelConfig(
        text=TextEncoderConfig(vocab_size=tok.vocab_size, max_position_embeddings=16),
        preprocess=PreprocessConfig(image_size=32, max_text_length=16),
        shape=ShapeConfig(size=4, weight=2.0),
        embed_dim=16,
    )
    export_model(RetrievalModel(config).eval(), tok, tmp_path)
    (tmp_path / "class_map.json").write_text(json.dumps(raw_class_map(LABELS)))
    return str(tmp_path)


def test_held_out_by_class_keeps_classes_whole_and_by_photo_keeps_every_class():
    ids = [f"q{i}" for i in range(400)]
    labels = [f"c{i % 40}" for i in range(400)]
    by_class = held_out(ids, labels, 0.3, "class")
    held_classes = {v for v, h in zip(labels, by_class, strict=True) if h}
    assert 0 < len(held_classes) < 40
    assert all(h == (v in held_classes) for v, h in zip(labels, by_class, strict=True))
    by_photo = held_out(ids, labels, 0.3, "photo")
    kept = {v for v, h in zip(labels, by_photo, strict=True) if not h}
    assert kept == set(labels) and 0.15 < sum(by_photo) / 400 < 0.45
    assert held_out(["a", "b"], [None, ""], 0.99, "class") == [False, False]  # unlabelled


def test_distinct_keeps_the_first_of_each_image_and_label():
    images = [b"x", b"x", b"y", b"x", b"x"]
    labels = ["couple", "couple", "couple", "kiss", "couple"]
    assert distinct(images, labels) == [True, False, True, True, False]  # a copy in a class
    assert distinct([], []) == []


def test_revise_sets_view_and_weight_under_a_new_version(model_dir, data):
    before = read_manifest(model_dir)
    choice = {"doc_view": "image_only", "shape_weight": 0.0, "recall@1": {}}
    version = revise(model_dir, doc_view="image_only", shape_weight=0.0, choice=choice)
    after = read_manifest(model_dir)  # its version matches its content
    assert version == after["model_version"] != before["model_version"]
    assert after["doc_view"] == "image_only" and after["view_choice"] == choice
    assert after["model"]["shape"]["weight"] == 0.0 and after["files"] == before["files"]
    doc = load_doc_encoder(model_dir)
    assert doc.doc_view == "image_only" and doc.model.shape is None
    images = data[0].column("image").to_pylist()[:4]
    assert embed_in_process(doc, images, None, doc=True).shape == (4, 16)


def test_doc_embedder_follows_the_export_view_and_marks_the_other(model_dir, data):
    batch = data[0].slice(0, 4)
    images, texts = batch.column("image").to_pylist(), batch.column("text").to_pylist()
    version = revise(model_dir, doc_view="image_only", shape_weight=2.0, choice={})
    own = DocEmbedder(model_dir, threads=1)(batch)
    fused = DocEmbedder(model_dir, threads=1, doc_view="fused")(batch)
    assert set(own.column("model_version").to_pylist()) == {version}
    assert set(fused.column("model_version").to_pylist()) == {version + "+fused"}
    doc = load_doc_encoder(model_dir)
    vectors = np.stack(own.column("vector").to_numpy(zero_copy_only=False))
    assert np.allclose(vectors, embed_in_process(doc, images, None, doc=True), atol=1e-5)
    fused_vectors = np.stack(fused.column("vector").to_numpy(zero_copy_only=False))
    assert np.allclose(fused_vectors, embed_in_process(doc, images, texts, doc=True), atol=1e-5)
    assert embedding_version("v", "image_only") == "v+image-only"
    assert embedding_version("v", "image_only", "image_only") == "v"


def test_choose_views_scores_what_the_encoders_embed(model_dir, data):
    """Each figure is the R@1 the export itself gives with that view and shape code, and the
    choice is ``pick_setting``'s on them."""
    docs, val = data
    split = Split("unused/class/train_queries.parquet", val, docs, "class")
    choice = choose_views(model_dir, split, 2.0)
    settings = ["2:grey", "1:grey", "4:grey", "2:ink", "1:ink", "4:ink", "0"]
    assert list(choice["recall@1"]) == [
        f"{view}@{setting}" for view in ("fused", "image_only") for setting in settings
    ]
    assert choice["queries"] == 8 and choice["held_out_by"] == "class"
    chosen = setting_key(choice["doc_view"], choice["shape_weight"], choice["shape_levels"])
    best_image = max(v for k, v in choice["recall@1"].items() if k.startswith("image_only"))
    best_fused = max(v for k, v in choice["recall@1"].items() if k.startswith("fused"))
    assert choice["fused_gain"]["recall@1"] == pytest.approx(best_fused - best_image)
    assert choice["recall@1"][chosen] == (
        best_fused if best_fused - best_image > choice["fused_gain"]["se"] else best_image
    )
    class_map = raw_class_map(LABELS)
    for view, weight, levels in (
        ("fused", 2.0, "grey"),
        ("image_only", 2.0, "ink"),
        ("fused", 0.0, None),
    ):
        revise(model_dir, doc_view=view, shape_weight=weight, shape_levels=levels, choice={})
        got = validation_recall(model_dir, docs, val, class_map)["recall@1"]
        assert got == pytest.approx(choice["recall@1"][setting_key(view, weight, levels)])
    assert read_manifest(model_dir)["model"]["shape"]["levels"] == "ink"  # None keeps it


def _hits(*rows: str) -> np.ndarray:
    return np.array([c == "1" for c in "".join(rows)])


def test_pick_setting_takes_fused_documents_only_beyond_a_class_clustered_error():
    """Fused documents win only by more than one standard error of their gain over the best
    image-only setting, counted over classes: six queries of one class are one draw."""
    classes = ["a"] * 6 + ["b", "c", "d", "e", "f", "g"]
    # fused gains one class of six queries: +0.5 R@1, but one class among seven
    one_class = {
        "fused@2:grey": _hits("111111", "000000"),
        "image_only@2:grey": _hits("000000", "000000"),
        "image_only@0": _hits("000000", "000000"),
    }
    chosen, gain = pick_setting(one_class, classes)
    sums = np.array([6.0, 0, 0, 0, 0, 0, 0])
    se = np.sqrt(7 / 6 * ((sums - sums.mean()) ** 2).sum()) / 12
    assert gain == pytest.approx({"recall@1": 0.5, "se": se})
    assert chosen == "image_only@2:grey"
    # the same gain spread over six classes is beyond the error: fused documents win
    many = {**one_class, "fused@2:grey": _hits("000000", "111111"), "fused@0": _hits("0" * 12)}
    chosen, gain = pick_setting(many, classes)
    assert gain["recall@1"] == pytest.approx(0.5) and gain["se"] < 0.5
    assert chosen == "fused@2:grey"
    # a tie goes to the earlier setting of the best view; equal views to image-only
    tie = {
        "fused@2:grey": _hits("1" * 12),
        "image_only@2:grey": _hits("0" * 12),
        "image_only@4:ink": _hits("1" * 12),
        "image_only@0": _hits("1" * 12),
    }
    assert pick_setting(tie, classes) == ("image_only@4:ink", {"recall@1": 0.0, "se": 0.0})
    better = {**tie, "image_only@4:ink": _hits("0" * 12), "image_only@0": _hits("0" * 11, "1")}
    assert pick_setting(better, classes)[0] == "fused@2:grey"
