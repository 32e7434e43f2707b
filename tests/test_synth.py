"""The synthetic catalog: contract schema, determinism, skew, and the injected governance truth."""

import io
import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from oclear_ray import synth
from oclear_ray.synth import KINDS, SynthConfig, generate, zipf_sizes

SMALL = SynthConfig(
    docs=300,
    classes=60,
    noise=0.2,
    alias_rate=0.1,
    broad_rate=0.1,
    text_query_rate=0.3,
    row_group_size=128,
    seed=7,
)
TINY = SynthConfig(docs=40, classes=12, queries_per_class=2, row_group_size=16, seed=3)


class Generated:
    """One generated set, loaded: rows of the three tables and the truth."""

    def __init__(self, out: Path, summary: dict):
        self.out, self.summary = out, summary
        self.docs = pq.read_table(out / "catalog.parquet").to_pylist()
        self.train = pq.read_table(out / "queries.parquet").to_pylist()
        self.eval = pq.read_table(out / "eval_queries.parquet").to_pylist()
        self.truth = json.loads((out / "truth.json").read_text())
        self.products = self.truth["products"]

    def product_of(self, doc_id: str) -> dict:
        return self.products[self.truth["doc_product"][doc_id]]

    def true_label(self, doc: dict) -> str:
        """The label before noise."""
        return self.truth["corrupted"].get(doc["doc_id"], doc["label"])


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Generated:
    out = tmp_path_factory.mktemp("small")
    return Generated(out, generate(out, SMALL))


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_files_and_schema_follow_the_contract(small):
    assert sorted(p.name for p in small.out.iterdir()) == sorted(synth.FILES.values())
    catalog = pq.ParquetFile(small.out / "catalog.parquet")
    assert catalog.schema_arrow.names == ["doc_id", "image", "text", "category", "label", "price"]
    assert [catalog.schema_arrow.field(n).type for n in ("doc_id", "image", "text")] == [
        pa.string(),
        pa.binary(),
        pa.string(),
    ]
    assert catalog.metadata.num_rows == 300
    assert catalog.metadata.num_row_groups == 3  # 128 + 128 + 44
    for name in ("queries.parquet", "eval_queries.parquet"):
        schema = pq.read_schema(small.out / name)
        assert schema.names == ["query_id", "image", "text", "label"]
        assert schema.field("image").type == pa.binary()
        assert schema.field("label").type == pa.string()


def test_summary_matches_truth_and_files(small):
    counts = small.summary["counts"]
    assert counts == small.truth["counts"]
    assert counts["documents"] == len(small.docs) == 300
    assert counts["classes"] == len(small.products) == 60
    assert counts["labels"] == 60 + 6 - 6  # classes + aliased products - broad pairs
    assert (counts["queries"], counts["eval_queries"]) == (len(small.train), len(small.eval))
    assert len(small.train) + len(small.eval) == 60 * SMALL.queries_per_class
    assert small.truth["config"] == asdict(SMALL)
    assert Path(small.summary["paths"]["truth"]) == small.out / "truth.json"


def test_ids_unique_and_every_class_has_documents(small):
    doc_ids = [d["doc_id"] for d in small.docs]
    assert len(set(doc_ids)) == len(doc_ids)
    query_ids = [q["query_id"] for q in small.train + small.eval]
    assert len(set(query_ids)) == len(query_ids)
    per_product = Counter(small.truth["doc_product"].values())
    assert set(per_product) == set(small.products)
    assert all(per_product[p] == entry["documents"] >= 1 for p, entry in small.products.items())
    clean = {d["label"] for d in small.docs if d["doc_id"] not in small.truth["corrupted"]}
    assert clean == {label for entry in small.products.values() for label in entry["labels"]}


def test_categories_are_paths_of_the_product_type(small):
    for doc in small.docs:
        product = small.product_of(doc["doc_id"])
        assert doc["category"] == KINDS[product["kind"]].category == product["category"]
        assert 2 <= len(doc["category"].split("/")) <= 3
        assert doc["price"] > 0


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    generate(tmp_path / "again", SMALL)
    for name in synth.FILES.values():
        assert (tmp_path / "again" / name).read_bytes() == (small.out / name).read_bytes()
    other = replace(SMALL, seed=8)
    generate(tmp_path / "other", other)
    catalog = "catalog.parquet"
    assert (tmp_path / "other" / catalog).read_bytes() != (small.out / catalog).read_bytes()


def test_rows_do_not_depend_on_drawing_order(small):
    plan = synth._plan(SMALL)
    for i in (299, 5, 150):  # drawn alone and out of order
        row = synth._doc_row(i, plan, small.docs[i]["doc_id"], SMALL)
        assert row == small.docs[i]


def test_zipf_sizes_are_exact_and_follow_the_law():
    sizes = zipf_sizes(20_000, 1_000, 1.0)
    assert sizes.sum() == 20_000 and sizes.min() >= 1
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(sizes[:100] - 1), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.05)
    flat = zipf_sizes(1_000, 300, 0.0)
    assert flat.sum() == 1_000 and flat.max() - flat.min() <= 1


def test_catalog_is_skewed(small):
    sizes = np.sort([entry["documents"] for entry in small.products.values()])[::-1]
    assert sizes[0] >= 10 * np.median(sizes)
    assert sizes[:6].sum() / sizes.sum() > 0.4  # top 10% of the classes
    assert list(sizes) == sorted(zipf_sizes(300, 60, SMALL.zipf), reverse=True)


def test_noise_is_realised_and_recorded_exactly(small):
    corrupted = small.truth["corrupted"]
    assert len(corrupted) == round(SMALL.noise * SMALL.docs)
    wrong = {
        d["doc_id"] for d in small.docs if d["label"] not in small.product_of(d["doc_id"])["labels"]
    }
    assert wrong == set(corrupted)
    for doc_id, label in corrupted.items():
        assert label in small.product_of(doc_id)["labels"]


def test_alias_groups_split_one_product_over_two_labels(small):
    groups = small.truth["alias_groups"]
    assert len(groups) == round(SMALL.alias_rate * SMALL.classes)
    for group in groups:
        product = small.products[group["product"]]
        assert product["labels"] == group["labels"] and group["canonical"] == group["labels"][0]
        docs = [
            d for d in small.docs if small.truth["doc_product"][d["doc_id"]] == group["product"]
        ]
        shares = Counter(small.true_label(d) for d in docs)
        assert set(shares) == set(group["labels"])
        assert shares[group["canonical"]] >= shares[group["labels"][1]] >= 1


def test_queries_carry_the_canonical_label(small):
    for query in small.train + small.eval:
        product = small.products[small.truth["query_product"][query["query_id"]]]
        assert query["label"] == product["canonical_label"] == product["labels"][0]


def test_broad_labels_cover_two_products(small):
    broad = small.truth["broad_labels"]
    assert len(broad) == round(SMALL.broad_rate * SMALL.classes)
    owners = Counter(entry["canonical_label"] for entry in small.products.values())
    for label, members in broad.items():
        assert len(members) == 2 and owners[label] == 2
        for product_id, doc_ids in members.items():
            assert small.products[product_id]["labels"] == [label]
            assert sorted(doc_ids) == sorted(
                d for d, p in small.truth["doc_product"].items() if p == product_id
            )
            by_id = {d["doc_id"]: d for d in small.docs}
            assert {small.true_label(by_id[d]) for d in doc_ids} == {label}
    assert sum(n == 2 for n in owners.values()) == len(broad)


def test_class_split_keeps_eval_classes_out_of_training_queries(small):
    train = {q["label"] for q in small.train}
    held = {q["label"] for q in small.eval}
    assert train and held and not train & held
    assert len(held) == round(SMALL.eval_fraction * len(train | held))


def test_random_split_mixes_classes(tmp_path):
    config = replace(TINY, split="random", queries_per_class=4)
    data = Generated(tmp_path, generate(tmp_path, config))
    assert len(data.eval) == round(0.5 * 12 * 4)
    assert {q["label"] for q in data.train} & {q["label"] for q in data.eval}


def test_images_decode_at_the_requested_size(small, tmp_path):
    for doc in small.docs:
        image = _decode(doc["image"])
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    photos = [q["image"] for q in small.train + small.eval if q["image"] is not None]
    for photo in photos:
        image = _decode(photo)
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
    tiny = Generated(tmp_path, generate(tmp_path, replace(TINY, image_size=32)))
    assert {_decode(d["image"]).size for d in tiny.docs + tiny.train} == {(32, 32)}


def test_queries_are_not_catalog_shots(small):
    first_doc = {}
    for doc in small.docs:
        first_doc.setdefault(small.truth["doc_product"][doc["doc_id"]], doc["image"])
    doc_bytes = {d["image"] for d in small.docs}
    for query in small.train + small.eval:
        if query["image"] is None:
            continue
        assert query["image"] not in doc_bytes
        shot = _decode(first_doc[small.truth["query_product"][query["query_id"]]])
        photo = np.asarray(_decode(query["image"]), np.float32)
        assert np.abs(photo - np.asarray(shot, np.float32)).mean() > 20


def _thumbs(images: list[bytes]) -> np.ndarray:
    """16 x 16 RGB thumbnails, mean-centred and L2-normalised: a pixel k-NN's features."""
    rows = [np.asarray(_decode(b).convert("RGB").resize((16, 16)), np.float32) for b in images]
    x = np.stack([r.ravel() - r.mean() for r in rows])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_query_photos_are_hard_but_learnable(small):
    """Pixel k-NN finds a photo's product far above chance (1 / 60), yet well below how it
    finds a catalog shot's: the photos are distorted, not unrecognisable."""
    doc_product = np.array([small.truth["doc_product"][d["doc_id"]] for d in small.docs])
    docs = _thumbs([d["image"] for d in small.docs])
    photos = [q for q in small.train + small.eval if q["image"] is not None]
    query_product = np.array([small.truth["query_product"][q["query_id"]] for q in photos])
    nearest = (_thumbs([q["image"] for q in photos]) @ docs.T).argmax(1)
    photo_r1 = (doc_product[nearest] == query_product).mean()
    doc_sims = docs @ docs.T
    np.fill_diagonal(doc_sims, -2.0)
    sizes = Counter(doc_product.tolist())
    several = np.array([sizes[p] > 1 for p in doc_product])
    shot_r1 = (doc_product[doc_sims.argmax(1)] == doc_product)[several].mean()
    assert photo_r1 >= 0.3
    assert shot_r1 - photo_r1 >= 0.2


def test_more_photos_are_new_photos_of_the_given_products(small, tmp_path):
    seen = sorted({small.truth["query_product"][q["query_id"]] for q in small.train})
    made = synth.more_photos(tmp_path / "more.parquet", SMALL, seen, per_product=2)
    rows = pq.read_table(tmp_path / "more.parquet").to_pylist()
    assert [r["query_id"] for r in rows] == list(made) and len(rows) == 2 * len(seen)
    assert sorted(set(made.values())) == seen
    for row in rows:
        assert row["label"] == small.products[made[row["query_id"]]]["canonical_label"]
    old = {q["image"] for q in small.train + small.eval}
    assert not old & {r["image"] for r in rows}
    synth.more_photos(tmp_path / "again.parquet", SMALL, seen, per_product=2)
    assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "more.parquet").read_bytes()
    with pytest.raises(ValueError, match="no such products in this catalog: p999999"):
        synth.more_photos(tmp_path / "bad.parquet", SMALL, ["p999999"])


def test_titles_name_the_attributes_and_some_are_empty(small):
    empty = [d for d in small.docs if d["text"] == ""]
    assert 0 < len(empty) < 0.15 * len(small.docs)
    for doc in small.docs:
        if doc["text"]:
            product = small.product_of(doc["doc_id"])
            text = doc["text"].lower()
            assert product["mark"].lower() in text
            assert any(noun in text for noun in KINDS[product["kind"]].nouns)
    titles = [d["text"] for d in small.docs if d["text"]]
    assert len(set(titles)) > 0.5 * len(titles)  # wording varies within a class


def test_text_queries(small):
    queries = small.train + small.eval
    typed = [q for q in queries if q["text"] is not None]
    assert 0.1 * len(queries) < len(typed) < 0.5 * len(queries)
    assert any(q["image"] is None for q in typed) and any(q["image"] for q in typed)
    assert all(q["image"] is not None for q in queries if q["text"] is None)
    for query in typed:
        product = small.products[small.truth["query_product"][query["query_id"]]]
        assert KINDS[product["kind"]].nouns[0] in query["text"]


def test_progress_counts_up_to_the_total(tmp_path):
    seen = []
    generate(tmp_path, TINY, progress=seen.append)
    assert seen == sorted(set(seen)) and seen[-1] == TINY.total_items == 40 + 24


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": 301}, "classes=301 must be <= docs=300"),
        ({"docs": 0}, "docs=0 must be >= 1"),
        ({"noise": 1.0}, r"noise=1.0 must be a number in \[0.0, 0.95\]"),
        ({"alias_rate": 0.5, "broad_rate": 0.3}, "alias_rate=0.5 \\+ 2 \\* broad_rate=0.3"),
        ({"split": "hash"}, "split='hash' must be 'class' or 'random'"),
        ({"image_size": 8}, r"image_size=8 must be in \[16, 1024\]"),
        ({"classes": 2.5}, "classes=2.5 must be an integer"),
        ({"empty_text_rate": -0.1}, "empty_text_rate=-0.1 must be a number"),
        ({"seed": -1}, "seed=-1 must be >= 0"),
    ],
)
def test_config_validation_names_the_bad_value(change, message):
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **change)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        SynthConfig(300, 60)
