"""Category governance: pure functions on small arrays, the class map applied in the training
pipeline, and one end-to-end ``oclear govern`` on a noisy synthetic catalog scored against its
truth.json."""

import html
import json
import re

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from oclear_ray import classmap as cmap
from oclear_ray import govern as g
from oclear_ray.ingest import resample


def blobs(sizes, dim=32, spread=0.05, seed=0):
    """Documents of len(sizes) well separated things: unit centres plus a little noise."""
    rng = np.random.default_rng(seed)
    centres = g.l2_normalise(rng.standard_normal((len(sizes), dim)))
    thing = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[thing] + spread * rng.standard_normal((len(thing), dim)) / np.sqrt(dim)
    return g.l2_normalise(x), thing


@pytest.fixture(scope="module")
def proposed():
    """Ten things of 12 documents: thing 0 half under an alias label, things 8 and 9 under one
    broad label, three documents of thing 1 mislabelled; ``organise``'s decisions."""
    x, thing = blobs([12] * 10)
    labels = [f"L{t}" if t < 8 else "broad" for t in thing]
    for i in np.flatnonzero(thing == 0)[:4]:
        labels[i] = "L0b"
    noisy = np.flatnonzero(thing == 1)[:3]
    for i, wrong in zip(noisy, ["L2", "L3", "L4"], strict=True):
        labels[i] = wrong
    doc_ids = [f"d{i}" for i in range(len(labels))]
    return doc_ids, labels, noisy, g.organise(x, labels, g.GovernConfig(link=0.9, mutual_link=0.9))


@pytest.fixture(scope="module")
def organised(proposed):
    doc_ids, labels, noisy, out = proposed
    return doc_ids, labels, noisy, g.build_class_map(doc_ids, labels, out, g.GovernConfig())


def test_noisy_rows_are_relabelled_to_the_class_of_their_content(organised):
    doc_ids, labels, noisy, cm = organised
    assert set(cm["relabelled"]) | set(cm["dropped"]) == {doc_ids[i] for i in noisy}
    for i in noisy:
        assert cm["relabelled"][doc_ids[i]]["to"] == cm["labels"]["L1"]
        assert cm["relabelled"][doc_ids[i]]["from"] == labels[i]
        assert 0.5 <= cm["relabelled"][doc_ids[i]]["confidence"] <= 1.0


def test_alias_is_merged_and_broad_label_split(organised):
    doc_ids, labels, _, cm = organised
    assert cm["labels"]["L0"] == cm["labels"]["L0b"]
    assert len(set(cm["labels"].values())) == len(cm["labels"]) - 1
    assert [m["labels"] for m in cm["merges"]] == [["L0", "L0b"]]
    assert [s["class"] for s in cm["splits"]] == ["broad"]
    parts = {
        cm["doc_class"].get(d, cm["labels"][lab])
        for d, lab in zip(doc_ids, labels, strict=True)
        if lab == "broad"
    }
    assert len(parts) == 2
    assert cm["num_classes"] == 10


def test_every_class_id_is_in_range_even_under_heavy_noise():
    x, thing = blobs([6] * 8, seed=1)
    rng = np.random.default_rng(1)
    labels = [f"L{t}" for t in thing]
    for i in rng.choice(len(labels), 20, replace=False):
        labels[i] = f"L{rng.integers(12)}"  # also labels that own nothing
    doc_ids = [f"d{i}" for i in range(len(labels))]
    cfg = g.GovernConfig(link=0.9, mutual_link=0.9)
    cm = g.build_class_map(doc_ids, labels, g.organise(x, labels, cfg), cfg)
    ids = [*cm["labels"].values(), *cm["doc_class"].values()]
    assert min(ids) >= 0 and max(ids) < cm["num_classes"] == len(cm["classes"])
    assert set(cm["labels"]) == set(labels)


def test_class_map_is_versioned_and_edits_are_refused(organised, tmp_path):
    cm = organised[3]
    path = tmp_path / "class_map.json"
    path.write_text(json.dumps(cm))
    assert cmap.load_class_map(str(path))["version"] == cm["version"]
    edited = json.loads(path.read_text())
    edited["labels"]["L1"] = 0
    with pytest.raises(ValueError, match="version"):
        cmap.load_class_map(edited)
    with pytest.raises(FileNotFoundError):
        cmap.load_class_map(str(tmp_path / "missing.json"))


def test_find_class_map_prefers_argument_then_workdir(organised, tmp_path):
    cm = organised[3]
    assert cmap.find_class_map(None, str(tmp_path)) is None
    (tmp_path / "govern").mkdir()
    (tmp_path / "govern" / "class_map.json").write_text(json.dumps(cm))
    assert cmap.find_class_map(None, str(tmp_path))["version"] == cm["version"]
    raw = cmap.raw_class_map(["b", "a"])
    assert cmap.find_class_map(raw, str(tmp_path))["labels"] == {"a": 0, "b": 1}


def test_apply_class_map_drops_relabels_and_splits():
    body = {
        **cmap.raw_class_map(["a", "b"]),
        "doc_class": {"d2": 1},
        "dropped": {"d3": {"reason": "noisy", "confidence": 0.3}},
    }
    cm = {
        "version": cmap.content_version({k: v for k, v in body.items() if k != "version"}),
        **{k: v for k, v in body.items() if k != "version"},
    }
    batch = pa.table({"doc_id": ["d1", "d2", "d3", "d4"], "label": ["a", "a", "b", "zzz"]})
    out = cmap.apply_class_map(batch, class_map=cmap.load_class_map(cm))
    assert out.column("doc_id").to_pylist() == ["d1", "d2"]
    assert out.column("label").to_pylist() == ["0", "1"]


def test_sampling_weights_keep_the_epoch_and_flatten_the_skew():
    sizes = np.array([400, 100, 4, 0])
    for policy in ("none", "sqrt", "balanced"):
        w = g.sampling_weights(sizes, policy)
        assert (sizes * w).sum() == pytest.approx(sizes.sum())
        assert w[3] == 0
    draws = sizes * g.sampling_weights(sizes, "sqrt")
    assert draws[0] / draws[1] == pytest.approx(2.0)
    balanced = sizes * g.sampling_weights(sizes, "balanced")
    assert balanced[0] == pytest.approx(balanced[2])
    capped = sizes * g.sampling_weights(sizes, "none", cap=150)
    assert capped[0] == pytest.approx(150)
    report = g.skew_report(sizes[:3], tail=5)
    assert report["tail_classes"] == 1 and report["largest"] == 400


def test_resample_draws_rows_by_class_weight():
    labels = np.repeat([0, 1], [1000, 1000])
    batch = {"label": labels, "x": np.arange(2000)}
    out = resample(batch, weights=np.array([2.0, 0.0]))
    assert set(out["label"].tolist()) == {0}
    assert 1800 < len(out["x"]) < 2200
    assert (out["label"] == labels[out["x"]]).all()


def test_text_features_ignore_order_and_case_but_see_the_mark():
    texts = ["red striped mug, mark Q", "Mark Q: striped RED mug", "red striped mug, mark X", ""]
    t = g.tfidf(g.text_counts(texts, 512))
    assert t[0] @ t[1] == pytest.approx(1.0)
    assert t[0] @ t[2] < 0.9
    assert not t[3].any()


def look_alikes():
    """One picture, two products that differ by their printed mark: 8 + 3 documents of the
    J-marked one under labels "J" and "J2", 4 + 3 of the T-marked one under "T" and "T2", one
    J-marked document under a stray label "S" (its other documents elsewhere)."""
    x, thing = blobs([19, 6])
    titles = ("teal coaster, mark {}", "Teal drink coaster, printed {}", "{} logo teal coaster")
    marks = ["J"] * 12 + ["T"] * 7
    labels = ["J"] * 8 + ["J2"] * 3 + ["S"] + ["T"] * 4 + ["T2"] * 3 + ["S"] * 6
    texts = [titles[i % 3].format(m) for i, m in enumerate(marks)]
    texts += [titles[i % 3].format("Q").replace("teal", "red") for i in range(6)]
    return x, labels, g.tfidf(g.text_counts(texts, 512))


def test_merges_need_titles_alike_not_only_a_shared_picture():
    x, labels, text = look_alikes()
    cfg = g.GovernConfig()
    cm = g.build_class_map(
        [f"d{i}" for i in range(len(labels))], labels, g.organise(x, labels, cfg, text), cfg
    )
    assert sorted(m["labels"] for m in cm["merges"]) == [["J", "J2"], ["T", "T2"]]
    reasons = {(e["label"], e["into"], e["reason"]) for m in cm["merges"] for e in m["evidence"]}
    assert {("J2", "J", "main cluster owned"), ("T2", "T", "same main cluster")} <= reasons
    # without titles the picture alone puts the T-marked product's labels under "J" too
    blind = g.organise(x, labels, cfg)
    names = blind["label_names"]
    classes = {names[i]: k for i, k in enumerate(blind["label_class"])}
    assert classes["T"] == classes["T2"] == classes["J"] != classes["S"]


def test_content_features_and_an_optional_model_block():
    from tests.conftest import png_bytes

    batch = pa.table(
        {
            "doc_id": ["a", "b", "c"],
            "image": [png_bytes((200, 30, 30)), png_bytes((30, 30, 200)), None],
            "text": ["red mug", "blue mug", ""],
            "label": ["x", "y", "x"],
        }
    )
    table = g.ContentFeatures(text_dim=64, thumb=4)(batch)
    assert table.column("doc_id").to_pylist() == ["a", "b", "c"]
    assert g.column_matrix(table, "thumb").shape == (3, 48)
    assert not g.column_matrix(table, "colour")[2].any()  # no image: zeros
    cfg = g.GovernConfig(text_dim=64, thumb=4)
    plain = g.features(table, cfg)
    with_model = g.features(table, cfg, model=np.eye(3, dtype=np.float32))
    assert with_model.shape[1] == plain.shape[1] + 3
    assert np.allclose(np.linalg.norm(with_model, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        g.combine([(plain, 0.0)])


def test_impute_missing_takes_the_nearest_neighbours_block():
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32)
    image = g.l2_normalise(np.array([[1.0, 0.1], [0.1, 1.0], [0.2, 1.0]]))
    assert g.impute_missing(text, image)[2].tolist() == [0.0, 1.0]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="policy"):
        g.GovernConfig(policy="zipf")
    with pytest.raises(ValueError, match="link"):
        g.GovernConfig(link=2.0)


def test_union_find_components():
    assert g.union_find(5, [(0, 1), (3, 4), (1, 0)]).tolist() == [0, 0, 1, 2, 2]


@pytest.fixture(scope="module")
def governed(ray_cluster, tmp_path_factory):
    """``oclear govern`` on a synthetic catalog (``oclear synth``) with 30 % label noise,
    aliased and broad labels."""
    from oclear_ray.cli import app

    data = tmp_path_factory.mktemp("data")
    synth = ["synth", str(data), "--docs", "300", "--classes", "30", "--noise", "0.3"]
    synth += ["--alias-rate", "0.1", "--broad-rate", "0.05", "--queries-per-class", "1"]
    synth += ["--image-size", "48", "--seed", "0"]
    drawn = CliRunner().invoke(app, synth)
    assert drawn.exit_code == 0, drawn.output
    work = tmp_path_factory.mktemp("work")
    args = ["govern", "--catalog", str(data / "catalog.parquet"), "--workdir", str(work)]
    args += ["--queries", str(data / "queries.parquet"), "--truth", str(data / "truth.json")]
    args += ["--policy", "sqrt"]  # sampling asked for (the default is none): its test needs it
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return data, work


@pytest.mark.ray
def test_govern_scores_against_truth_and_writes_a_report(governed):
    """Noise precision/recall >= 0.8 against truth.json; class map, report.json, report.md and
    report.html (a section per decision, thumbnails) in WORKDIR/govern."""
    data, work = governed
    cm = cmap.load_class_map(str(work / "govern" / "class_map.json"))
    scores = g.score_against_truth(cm, json.loads((data / "truth.json").read_text()))
    assert scores["noise"]["precision"] >= 0.8 and scores["noise"]["recall"] >= 0.8, scores
    assert scores["noise"]["relabel_accuracy"] >= 0.8, scores
    assert scores["merge"]["precision"] >= 0.5 and scores["merge"]["recall"] >= 0.5, scores
    report = json.loads((work / "govern" / "report.json").read_text())
    assert report["version"] == cm["version"]
    assert report["queries"]["known_labels"] == report["queries"]["labelled"]
    assert (work / "govern" / "report.md").read_text().startswith("# Class governance")
    ids = decision_ids(work)
    assert len(ids) == report["review"]["proposed"] > 0
    assert {f"relabel:{d}" for d in cm["relabelled"]} | {f"drop:{d}" for d in cm["dropped"]} <= ids
    assert (work / "govern" / "report.html").read_text().count('<img src="data:image/png') > 0


def decision_ids(work) -> set[str]:
    """The decision ids report.html lists, as a person would copy them."""
    page = (work / "govern" / "report.html").read_text()
    return {html.unescape(i) for i in re.findall(r'<section class="\w+" id="([^"]+)"', page)}


@pytest.mark.ray
def test_govern_review_undoes_what_it_rejects(governed, tmp_path):
    """``oclear govern --review``: a merge and a relabel picked from report.html are undone."""
    from oclear_ray.cli import app

    data, work = governed
    ids = sorted(decision_ids(work))
    merge = next(i for i in ids if i.startswith("merge:"))
    relabel = next(i for i in ids if i.startswith("relabel:"))
    (tmp_path / "review.yaml").write_text(f'reject: ["{merge}", "{relabel}"]\n')
    args = ["govern", "--catalog", str(data / "catalog.parquet"), "--workdir", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--review", str(tmp_path / "review.yaml")])
    assert result.exit_code == 0, result.output
    cm = cmap.load_class_map(str(tmp_path / "govern" / "class_map.json"))
    label, into = merge.removeprefix("merge:").split("->")
    doc = relabel.removeprefix("relabel:")
    assert cm["labels"][label] != cm["labels"][into]
    assert doc not in cm["relabelled"] and doc not in cm["doc_class"]
    assert cm["review"]["rejected"] == [merge, relabel]
    consistent(cm, *_rows(data))
    assert (tmp_path / "govern" / "report.html").read_text().count('class="rejected"') == 2


def _rows(data) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(data / "catalog.parquet", columns=["doc_id", "label"])
    rows = [(d, lab) for d, lab in zip(*table.to_pydict().values(), strict=True) if lab]
    return [d for d, _ in rows], [lab for _, lab in rows]


@pytest.mark.ray
def test_training_pipeline_applies_the_class_map_and_resamples(governed, tmp_path):
    """The docs pipeline of ``fit`` yields governed class ids, drawn by the sampling policy;
    a pass of a small catalog is as many resampled copies of it as fill ``PASS_STEPS``."""
    from oclear_ray.config import TrainConfig
    from oclear_ray.contract import CATALOG
    from oclear_ray.read import read
    from oclear_ray.text import train_tokenizer
    from oclear_ray.train import PASS_STEPS, _pipeline

    data, work = governed
    cm = cmap.find_class_map(None, str(work))
    texts = [t["text"] for t in read(str(data / "catalog.parquet"), CATALOG).take_all()]
    tokenizer_path = str(tmp_path / "tokenizer.json")
    train_tokenizer(texts, vocab_size=200).save(tokenizer_path)
    cfg = TrainConfig.from_dict(
        {
            "model": {
                "preprocess": {"image_size": 16, "max_text_length": 8},
                "shape": {"size": 8},
            },
            "data": {"augment": False, "doc_as_query_rate": 0.0},
        }
    )
    ds = read(str(data / "catalog.parquet"), CATALOG)
    rows = _pipeline(
        ds, view="doc", cfg=cfg, class_map=cm, tokenizer_path=tokenizer_path
    ).take_all()
    counts = np.bincount([r["label"] for r in rows], minlength=cm["num_classes"])
    sizes = np.array([c["size"] for c in cm["classes"]])
    copies = -(-PASS_STEPS * cfg.data.batch_size * cfg.run.workers // int(sizes.sum()))
    assert copies > 1 and len(counts) == cm["num_classes"]
    assert counts[sizes == 0].sum() == 0
    largest = int(np.argmax(sizes))
    # square-root sampling draws a huge class less than its share, in every copy
    assert counts[largest] < copies * sizes[largest]
    assert abs(len(rows) - copies * sizes.sum()) < 0.2 * copies * sizes.sum()


def _text_of(titles):
    return g.tfidf(g.text_counts(titles, 256))


def test_a_class_with_one_document_is_never_changed_on_looks_alone():
    """Each label has one document and a pair of them look the same (one cluster): no drop,
    no relabel, no merge (titles name two things)."""
    x, thing = blobs([2, 1, 1, 1])  # documents 0 and 1 are one look
    labels = ["apache-kafka", "apache-spark", "kotlin", "rust", "go"]
    titles = ["Apache Kafka. colour: black", "Apache Spark. colour: orange", "Kotlin", "Rust", "Go"]
    cfg = g.GovernConfig(link=0.9, mutual_link=0.9)
    out = g.organise(x, labels, cfg, text=_text_of(titles), titles=titles)
    cm = g.build_class_map([f"d{i}" for i in range(5)], labels, out, cfg)
    assert cm["dropped"] == {} and cm["relabelled"] == {} and cm["merges"] == []
    assert cm["num_classes"] == 5 and out["decision"].cluster[0] == out["decision"].cluster[1]


def test_labels_named_apart_by_an_attribute_are_not_merged_however_alike():
    """Two labels over one look (one thing's documents split between them): merged when the
    titles agree, kept apart when every title of one names an attribute the other's lack."""
    x, thing = blobs([8, 8, 8])
    labels = [f"L{t}" for t in thing]
    labels[4:8] = ["L0b"] * 4
    same = ["yellow waving hand"] * 24
    tones = [*["waving hand: light skin tone"] * 4, *["waving hand: dark skin tone"] * 4]
    tones += ["ok hand"] * 8 + ["thumbs up"] * 8
    cfg = g.GovernConfig(link=0.9, mutual_link=0.9)
    for titles, merged in ((same, True), (tones, False)):
        out = g.organise(x, labels, cfg, text=_text_of(titles), titles=titles)
        cm = g.build_class_map([f"d{i}" for i in range(24)], labels, out, cfg)
        assert (cm["labels"]["L0"] == cm["labels"]["L0b"]) is merged, titles[:8]
        assert cm["dropped"] == {} and cm["relabelled"] == {}


def test_a_stray_is_relabelled_only_when_its_title_names_the_new_class():
    """Documents of thing 1 carrying labels of things 2 and 3: relabelled when their titles
    name thing 1 (a mark the owner's titles carry), kept when their titles name their own
    label's thing (a look-alike, not a wrong label)."""
    x, thing = blobs([10, 10, 10, 10])
    labels = [f"L{t}" for t in thing]
    strays = np.flatnonzero(thing == 1)[:2]
    labels[strays[0]], labels[strays[1]] = "L2", "L3"
    names = {0: "mug mark A", 1: "mug mark B", 2: "mug mark C", 3: "mug mark D"}
    cfg = g.GovernConfig(link=0.9, mutual_link=0.9)
    titles = [names[t] for t in thing]  # the strays' titles name thing 1: wrong labels
    out = g.organise(x, labels, cfg, text=_text_of(titles), titles=titles)
    cm = g.build_class_map([f"d{i}" for i in range(40)], labels, out, cfg)
    assert set(cm["relabelled"]) == {f"d{i}" for i in strays}
    assert {r["to"] for r in cm["relabelled"].values()} == {cm["labels"]["L1"]}
    titles[strays[0]], titles[strays[1]] = names[2], names[3]  # they name their own labels
    out = g.organise(x, labels, cfg, text=_text_of(titles), titles=titles)
    cm = g.build_class_map([f"d{i}" for i in range(40)], labels, out, cfg)
    assert cm["relabelled"] == {} and cm["dropped"] == {}
    with pytest.raises(ValueError, match="govern min_support must be >= 1, got 0"):
        g.GovernConfig(min_support=0)


def test_title_tokens_count_repeats_and_read_the_name_sentence_only():
    assert g.title_tokens("family: man, man, boy. boy, child") == {
        "family#1",
        "man#1",
        "man#2",
        "boy#1",
    }
    assert "##1" in g.title_tokens("keycap: #. keycap") and "*#1" in g.title_tokens("keycap: *")


# --------------------------------------------------------------------------- review


def consistent(cm, doc_ids, labels):
    """Class ids 0..num_classes-1, sizes and weights that match the rows' classes."""
    n = cm["num_classes"]
    assert [c["id"] for c in cm["classes"]] == list(range(n))
    rows = [
        cm["doc_class"].get(d, cm["labels"][lab])
        for d, lab in zip(doc_ids, labels, strict=True)
        if d not in cm["dropped"]
    ]
    assert np.bincount(rows, minlength=n).tolist() == [c["size"] for c in cm["classes"]]
    assert len([c["weight"] for c in cm["classes"] if c["weight"] > 0]) == n
    assert cmap.load_class_map(cm)["version"] == cm["version"]


def test_report_html_lists_every_decision_with_pictures_and_escaped_titles(proposed, organised):
    from oclear_ray import review
    from tests.conftest import png_bytes

    doc_ids, labels, noisy, out = proposed
    decisions = g.decisions(doc_ids, labels, out, g.GovernConfig())
    ids = [d["id"] for d in decisions]
    assert ids == ["merge:L0b->L0", "split:broad", *(f"relabel:{doc_ids[i]}" for i in noisy)]
    thumb = review.thumbnail(png_bytes(size=(96, 40)))
    assert thumb.startswith("data:image/png;base64,")
    docs = {
        d: {"text": f"<b>mug</b> & {d}", "label": lab, "thumb": thumb}
        for d, lab in zip(doc_ids, labels, strict=True)
    }
    page = review.html(decisions, docs, organised[3], review.Review(reject=frozenset(ids[:1])))
    for decision_id in ids:
        assert f'<section class="{"rejected" if decision_id == ids[0] else "proposed"}" ' in page
        assert f'id="{decision_id.replace(">", "&gt;")}"' in page
    assert page.count("<img ") == sum(len(p["docs"]) for d in decisions for p in d["groups"])
    assert "<b>mug" not in page and "&lt;b&gt;mug&lt;/b&gt; &amp; d0" in page
    assert "(6 of 12 shown)" in page and "--review" in page


def test_thumbnail_fits_the_side_and_keeps_the_aspect():
    import base64
    import io

    from PIL import Image

    from oclear_ray.review import thumbnail
    from tests.conftest import png_bytes

    data = base64.b64decode(thumbnail(png_bytes(size=(96, 40))).split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == (48, 20)
    assert thumbnail(None) is None


def test_a_review_undoes_the_rejected_decisions_and_the_rest_stands(proposed, organised):
    from oclear_ray.review import Review

    doc_ids, labels, noisy, out = proposed
    base, cfg = organised[3], g.GovernConfig()

    def reviewed(**ids):
        cm = g.build_class_map(
            doc_ids, labels, out, cfg, Review(**{k: frozenset(v) for k, v in ids.items()})
        )
        consistent(cm, doc_ids, labels)
        assert cm["version"] != base["version"]
        return cm

    cm = reviewed(reject=["merge:L0b->L0"])
    assert cm["labels"]["L0"] != cm["labels"]["L0b"] and cm["merges"] == []
    assert cm["num_classes"] == 11 and [s["class"] for s in cm["splits"]] == ["broad"]
    assert cm["relabelled"].keys() == base["relabelled"].keys()
    assert cm["review"] == {"accepted": [], "rejected": ["merge:L0b->L0"]}

    row = noisy[0]
    cm = reviewed(reject=[f"relabel:{doc_ids[row]}"])
    assert doc_ids[row] not in cm["relabelled"] and doc_ids[row] not in cm["doc_class"]
    assert cm["relabelled"].keys() == {doc_ids[i] for i in noisy[1:]}
    size = {c["name"]: c["size"] for c in cm["classes"]}
    before = {c["name"]: c["size"] for c in base["classes"]}
    assert size["L1"] == before["L1"] - 1 and size[labels[row]] == before[labels[row]] + 1

    cm = reviewed(reject=["split:broad"], accept=["merge:L0b->L0"])
    assert cm["splits"] == [] and cm["num_classes"] == 9
    broad = [d for d, lab in zip(doc_ids, labels, strict=True) if lab == "broad"]
    assert not set(broad) & cm["doc_class"].keys()
    assert cm["merges"] == base["merges"] and cm["relabelled"] == base["relabelled"]
    assert cm["review"] == {"accepted": ["merge:L0b->L0"], "rejected": ["split:broad"]}


def test_a_rejected_merge_stays_apart_whatever_links_remain():
    pairs = [(0, 1, "same centre", 0.99), (1, 2, "same centre", 0.98), (2, 0, "same centre", 0.97)]
    classes, kept = g.merge_apart(4, pairs, set())
    assert classes.tolist() == g.merge_labels(4, pairs).tolist() == [0, 0, 0, 1]
    classes, kept = g.merge_apart(4, pairs, {frozenset((2, 0))})
    assert classes.tolist() == [0, 0, 1, 2] and kept == pairs[:1]


def test_review_errors_name_the_bad_ids_and_files(proposed, tmp_path):
    from oclear_ray.review import Review, load_review

    doc_ids, labels, _, out = proposed
    bad = Review(reject=frozenset({"merge:L9->nowhere", "drop:d0"}))
    with pytest.raises(ValueError, match=r"\['drop:d0', 'merge:L9->nowhere'\]"):
        g.build_class_map(doc_ids, labels, out, g.GovernConfig(), bad)
    with pytest.raises(ValueError, match="both accepts and rejects split:broad"):
        Review(accept=frozenset({"split:broad"}), reject=frozenset({"split:broad"}))
    (tmp_path / "r.yaml").write_text('reject:\n  - "merge:L0b->L0"\naccept: [split:broad]\n')
    (tmp_path / "r.json").write_text('{"reject": ["merge:L0b->L0"], "accept": ["split:broad"]}')
    for name in ("r.yaml", "r.json"):
        verdict = load_review(str(tmp_path / name))
        assert verdict.reject == {"merge:L0b->L0"} and verdict.accept == {"split:broad"}
    (tmp_path / "empty.yaml").write_text("")
    assert load_review(str(tmp_path / "empty.yaml")) == Review()
    for text, match in (
        ('{"reject": "drop:d1"}', "reject must be a list"),
        ("rejected: []", r"keys are 'reject' and 'accept', got \['rejected'\]"),
        ("- drop:d1", "a mapping"),
        ("[a", "YAML"),
    ):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ValueError, match=match):
            load_review(str(tmp_path / "bad.yaml"))
    with pytest.raises(FileNotFoundError, match="no review file"):
        load_review(str(tmp_path / "missing.yaml"))


def test_cli_govern_refuses_a_bad_review_file_before_starting_ray(tmp_path):
    from oclear_ray.cli import app

    (tmp_path / "review.yaml").write_text("reject: drop:d1\n")
    args = ["govern", "--catalog", str(tmp_path / "c.parquet"), "--workdir", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--review", str(tmp_path / "review.yaml")])
    assert result.exit_code == 2 and "reject must be a list" in result.output, result.output
