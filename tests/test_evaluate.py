"""Retrieval metrics against hand-computed values, and the evaluate stage end to end on Ray."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from oclear_ray.cli import app
from oclear_ray.embed import (
    EmbedConfig,
    embed_catalog,
    list_parts,
    read_parts,
    read_summary,
    vectors_of,
)
from oclear_ray.evaluate import (
    Catalog,
    Judge,
    _view_line,
    encode_queries,
    exact_search,
    label_recall,
    map_at_r,
    ndcg_at,
    per_category,
    read_judgments,
    recall_at,
    recall_curve,
    relevance,
    retrieval_metrics,
)
from oclear_ray.export import load_query_encoder
from oclear_ray.index import IndexConfig, sync_index
from oclear_ray.search import SearchIndex, knn_overlap, normalize
from oclear_ray.synth import SynthConfig, generate
from tests.helpers import catalog_model

DOC_LABELS = ["a", "b", "a", "c", "d"]  # R: a 2, b 1, c 1, d 1, e 0
QUERY_LABELS = ["a", "b", "c", "e"]
I = np.array(
    [
        [1, 0, 3, 2, 4],  # a: relevant at ranks 2 and 4
        [1, 0, 2, 3, 4],  # b: relevant at rank 1
        [0, 1, 2, 4, -1],  # c: never found (padding -1 past the last result)
        [0, 1, 2, 3, 4],  # e: no document carries the label
    ]
)

R = np.array([2, 1, 1, 0])


def test_exact_search_breaks_ties_in_catalog_order_at_every_k():
    """Duplicate documents score alike: whatever ``k``, the first in the catalog comes first."""
    rng = np.random.default_rng(0)
    xb = normalize(rng.normal(size=(64, 8)).astype(np.float32))
    xb[[5, 17, 40]] = xb[3]  # four copies of one document
    xq = np.stack([xb[3], xb[9]])
    for k in (1, 2, 4, 10, 64):
        D, I = exact_search(xq, xb, k)
        assert D.shape == I.shape == (2, k)
        assert I[0].tolist() == [3, 5, 17, 40, *I[0, 4:].tolist()][:k]
        assert I[1, 0] == 9 and np.all(np.diff(D, axis=1) <= 1e-6)


def test_the_report_names_the_chosen_view_and_the_fused_gain_with_its_error():
    choice = {
        "shape_weight": 4.0,
        "shape_levels": "ink",
        "recall@1": {"fused@4:ink": 0.864, "image_only@4:ink": 0.803},
        "fused_gain": {"recall@1": 0.061, "se": 0.064},
    }
    assert _view_line({"doc_view": "image_only", "view_choice": choice}) == (
        "image_only, shape weight 4 on ink levels (validation R@1 fused@4:ink 0.864, "
        "image_only@4:ink 0.803; fused documents +0.061 ± 0.064 over image-only)"
    )
    assert _view_line({"doc_view": "fused", "view_choice": None}) == (
        "fused (not chosen on validation queries)"
    )


def test_relevance_recall_and_curve_by_label_match():
    rel = relevance(I, QUERY_LABELS, DOC_LABELS)
    assert rel.tolist()[0] == [False, True, False, True, False]
    assert not rel[2].any() and not rel[3].any()
    assert recall_at(rel, (1, 2, 5)) == {"recall@1": 0.25, "recall@2": 0.5, "recall@5": 0.5}
    assert recall_curve(rel, 10) == [0.25, 0.5, 0.5, 0.5, 0.5]
    assert label_recall(I, QUERY_LABELS, DOC_LABELS, ks=(1,)) == {"recall@1": 0.25}


def _catalog(labels, categories=None) -> Catalog:
    n = len(labels)
    return Catalog(
        doc_ids=np.array([f"d{i}" for i in range(n)], dtype=object),
        labels=np.array(labels, dtype=object),
        categories=np.array(categories or [None] * n, dtype=object),
        vectors=np.zeros((n, 2), np.float32),
        summary={},
    )


def test_judgments_name_the_relevant_documents_whatever_their_labels():
    """A judge by label equals ``relevance``; with judgments a document is relevant when they
    name it (d2 carries label a but is another product; d4, labelled d, is q0's product), R
    counts the judged documents the catalog holds, and a query's category is its judged
    documents' most common one."""
    docs = _catalog(DOC_LABELS, ["toys/car", "toys/car", "food", "food", "toys/ball"])
    table = pa.table({"query_id": ["q0", "q1", "q2", "q3"], "label": QUERY_LABELS})
    by_label = Judge.of(docs, table, None)
    assert (by_label.relevance(I) == relevance(I, QUERY_LABELS, DOC_LABELS)).all()
    assert by_label.counts().tolist() == R.tolist() and by_label.basis == "label"
    judged = {"q0": {"d0", "d4"}, "q1": {"d1", "gone"}, "q2": set(), "q3": {"d3"}}
    judge = Judge.of(docs, table, judged)
    assert judge.basis == "judgments"
    assert judge.relevance(I).tolist()[0] == [False, True, False, False, True]
    assert judge.relevance(I)[:, 0].tolist() == [False, True, False, False]
    assert judge.counts().tolist() == [2, 1, 0, 1]
    assert judge.categories(1) == ["toys", "toys", "(none)", "food"]
    assert by_label.categories(2) == ["toys/car", "toys/car", "food", "(none)"]
    with pytest.raises(ValueError, match="name no document of this catalog"):
        Judge.of(docs, table, {"q0": {"x1"}, "q1": set(), "q2": {"x2"}, "q3": set()})


def test_judgments_file_is_read_or_refused_by_name(tmp_path):
    good = tmp_path / "j.json"
    good.write_text(json.dumps({"q0": ["d1", "d2"], "q1": []}))
    assert read_judgments(str(good)) == {"q0": {"d1", "d2"}, "q1": set()}
    for text in ('["d1"]', '{"q0": "d1"}', '{"q0": [1]}', "not json"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match="judgments .*bad.json"):
            read_judgments(str(bad))


def test_map_at_r_and_ndcg_exact_values():
    rel = relevance(I, QUERY_LABELS, DOC_LABELS)
    # a: in its first R=2 ranks only rank 2 is relevant, P@2 = 1/2 -> AP (1/2)/2; b: AP 1
    assert map_at_r(rel, R) == pytest.approx((0.25 + 1.0 + 0 + 0) / 4)
    ndcg_a = (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert ndcg_at(rel, R, 10) == pytest.approx((ndcg_a + 1.0) / 4)
    assert ndcg_at(rel, R, 1) == pytest.approx(0.25)


def test_map_at_r_matches_a_plain_reference():
    rng = np.random.default_rng(0)
    rel = rng.random((50, 12)) < 0.3
    R = rng.integers(0, 20, 50)  # some above the 12 ranks searched: capped

    def reference(row, r):
        r = min(r, len(row))
        hits, total = 0, 0.0
        for i in range(r):
            if row[i]:
                hits += 1
                total += hits / (i + 1)
        return total / r if r else 0.0

    want = np.mean([reference(row, r) for row, r in zip(rel, R, strict=True)])
    assert map_at_r(rel, R) == pytest.approx(want)


def test_per_category_and_ann_overlap():
    rel = relevance(I, QUERY_LABELS, DOC_LABELS)
    got = per_category(rel, ["x", "x", "y", "y"])
    assert got == {"x": {"queries": 2, "recall@1": 0.5}, "y": {"queries": 2, "recall@1": 0.0}}
    # padding in the ANN rows never matches (exact rows have none)
    assert knn_overlap([[1, 2, 3], [7, -1, -1]], [[3, 4, 5], [7, 8, 9]], 3) == pytest.approx(
        (1 / 3 + 1 / 3) / 2
    )
    # exact search over 2 documents is 2 wide: the share of those 2
    assert knn_overlap([[1, -1, -1], [5, 6, -1]], [[0, 1], [6, 5]], 10) == pytest.approx(3 / 4)


def test_ann_overlap_equals_the_hand_written_share_it_replaced():
    """FAISS's measure gives what the per-query share of the exact top-k found gave, on ANN
    rows with padding against exact rows (which exact search never pads)."""
    rng = np.random.default_rng(0)
    truth = np.array([rng.permutation(15)[:10] for _ in range(40)])
    found = np.array([rng.permutation(15)[:12] for _ in range(40)])
    found[rng.random(found.shape) < 0.2] = -1

    def share(a, b):
        return len(set(a[:10]) & set(b[:10]) - {-1}) / len(set(b[:10]))

    want = np.mean([share(a, b) for a, b in zip(found, truth, strict=True)])
    assert knn_overlap(found, truth, 10) == pytest.approx(want)


class FakeEncoder:
    """Marks what each call carried: [has image, has text, len(text)]."""

    def encode_query(self, images=None, texts=None):
        n = len(images if images is not None else texts)
        text = [len(t) for t in texts] if texts is not None else [0] * n
        rows = [[images is not None, texts is not None, t] for t in text]
        return torch.tensor(rows, dtype=torch.float32)


def test_encode_queries_groups_mixed_rows_in_order():
    got = encode_queries(FakeEncoder(), [b"x", None, b"y", b"z"], ["ab", "abc", "", "a"])
    assert got.tolist() == [[1, 1, 2], [0, 1, 3], [1, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="neither image nor text"):
        encode_queries(FakeEncoder(), [None], [""])


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic catalog and eval queries (some typed) plus one undecodable query photo."""
    root = tmp_path_factory.mktemp("data")
    generate(str(root), SynthConfig(docs=100, classes=24, text_query_rate=0.4, seed=1))
    queries = pq.read_table(root / "eval_queries.parquet")
    bad = queries.slice(0, 1).to_pylist()
    bad[0].update(query_id="broken", image=b"\x89PNG not really")
    full = pa.concat_tables([queries, pa.Table.from_pylist(bad, schema=queries.schema)])
    pq.write_table(full, root / "queries.parquet")
    return str(root / "catalog.parquet"), str(root / "queries.parquet"), queries.num_rows


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory):
    """A small random-init model exported the way training exports it."""
    return catalog_model(data[0], tmp_path_factory.mktemp("model"))


METRICS = ("recall@1", "recall@5", "recall@10", "map@r", "ndcg@10")


@pytest.fixture(scope="module")
def fused(ray_cluster, data, model_dir, tmp_path_factory):
    """embed (fused) -> index (2 shards) -> `oclear eval --image-only-docs`."""
    workdir = str(tmp_path_factory.mktemp("fused"))
    embed_catalog(data[0], workdir, model_dir=model_dir, config=EmbedConfig(batch_size=32))
    sync_index(workdir, IndexConfig(shards=2))
    args = ["eval", "--workdir", workdir, "--queries", data[1], "--model-dir", model_dir]
    out = CliRunner().invoke(app, [*args, "--image-only-docs", "--grid-queries", "5"])
    assert out.exit_code == 0, out.output
    assert "image_only" in out.output and "ANN vs exact recall@10" in out.output
    return workdir, json.loads(Path(workdir, "eval", "report.json").read_text())


@pytest.fixture(scope="module")
def queries(data, model_dir):
    """The good query rows embedded in this process (no Ray), unit vectors."""
    table = pq.read_table(data[1]).slice(0, data[2])
    images, texts = table.column("image").to_pylist(), table.column("text").to_pylist()
    xq = encode_queries(load_query_encoder(model_dir), images, [t or "" for t in texts])
    return normalize(xq), table.column("label").to_pylist()


def test_report_has_metrics_versions_and_counts(fused, data, model_dir):
    report = fused[1]
    assert report["n_queries"] == data[2] and report["n_documents"] == 100
    assert report["validation"]["quarantined"] == 1
    for row in (report, report["exact"], *report["fusion_ablation"].values()):
        if isinstance(row, dict):
            assert all(0.0 <= row[m] <= 1.0 for m in METRICS), row
    assert report["recall@1"] <= report["recall@5"] <= report["recall@10"]
    assert 0.0 <= report["ann_vs_exact"]["recall@10"] <= 1.0
    assert sum(c["queries"] for c in report["per_category"].values()) == data[2]
    assert report["model_version"] == load_query_encoder(model_dir).model_version
    assert report["doc_inputs"] == "image+text" and report["index_version"] == 1
    assert set(report["timing_s"]) >= {"embed_queries_s", "ann_search_s", "total_s"}


def test_reported_recall_matches_a_search_of_queries_embedded_here(fused, queries, model_dir):
    """The report's recall equals recall from embedding the queries here, in one batch."""
    (workdir, report), (xq, labels) = fused, queries
    index = SearchIndex.load(f"{workdir}/index", load_query_encoder(model_dir).model_version)
    _, found = index.search(xq, 10)
    docs = index.documents
    by_id = dict(zip(docs["id"].to_pylist(), docs["label"].to_pylist(), strict=True))
    hits = np.array([[by_id.get(i) for i in row] for row in found], dtype=object)
    want = recall_at(hits == np.array(labels, dtype=object)[:, None], (1, 10))
    assert report["recall@1"] == pytest.approx(want["recall@1"])
    assert report["recall@10"] == pytest.approx(want["recall@10"])


def test_a_small_query_set_is_embedded_in_process_as_the_pool_embeds_it(
    fused, data, model_dir, tmp_path, monkeypatch
):
    """A few queries are embedded in this process, no actor pool started: the same rows,
    vectors and thumbnails as the Ray Data actor pool gives them."""
    import oclear_ray.evaluate as evaluate

    config = evaluate.EvalConfig(grid_queries=5)
    with monkeypatch.context() as m:
        m.setattr(evaluate, "IN_PROCESS_ROWS", 0)
        pool = evaluate._read_queries(data[1], str(tmp_path), model_dir, config, None)
    monkeypatch.setattr(evaluate, "embed_queries", None)  # the pool would fail
    here = evaluate._read_queries(data[1], str(tmp_path), model_dir, config, None)
    assert here[1:] == pool[1:] and here[0].num_rows == pool[0].num_rows == data[2]
    for name in ("query_id", "label", "text", "thumbnail"):
        assert here[0][name] == pool[0][name]
    np.testing.assert_allclose(vectors_of(here[0]), vectors_of(pool[0]), rtol=0, atol=1e-6)


def test_fused_side_of_the_ablation_is_the_exact_search(fused):
    report = fused[1]
    for m in METRICS:
        assert report["fusion_ablation"]["fused"][m] == pytest.approx(report["exact"][m])


def test_html_has_curves_and_an_inline_grid(fused):
    page = Path(fused[0], "eval", "report.html").read_text()
    assert "<svg" in page and page.count("<polyline") == 2 and page.count('class="row"') == 5
    assert page.count("data:image/png;base64,") >= 5 * 8  # at least the documents
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_embed_image_only_gives_the_ablation_numbers(fused, data, model_dir, queries, tmp_path):
    """`oclear embed --doc-view image_only`, searched exactly, scores what the ablation
    measured."""
    workdir = str(tmp_path)
    args = ["embed", "--catalog", data[0], "--workdir", workdir, "--model-dir", model_dir]
    out = CliRunner().invoke(app, [*args, "--doc-view", "image_only"])
    assert out.exit_code == 0, out.output
    summary = read_summary(f"{workdir}/embed")
    assert summary["doc_inputs"] == "image" and summary["model_version"].endswith("+image-only")
    docs = read_parts(list_parts(f"{workdir}/embed"))
    xq, labels = queries
    _, found = exact_search(xq, normalize(vectors_of(docs)), 100)
    rel = relevance(found, labels, docs.column("label").to_pylist())
    R = np.array([docs.column("label").to_pylist().count(label) for label in labels])
    got = retrieval_metrics(rel, R, (1, 5, 10))
    for m in METRICS:
        assert got[m] == pytest.approx(fused[1]["fusion_ablation"]["image_only"][m])


def test_eval_with_judgments_scores_only_judged_queries_by_them(fused, data, model_dir, tmp_path):
    """`oclear eval --judgments`: the judged queries only, a hit being a judged document.
    Judging each query's own label's documents gives the label figures; judging half the
    queries scores those; judging none is refused. (In a copy of the work directory: the
    module's report stays.)"""
    import shutil

    workdir, report = str(tmp_path / "work"), fused[1]
    shutil.copytree(fused[0], workdir)
    table = pq.read_table(data[1]).slice(0, data[2])
    docs = pq.read_table(data[0], columns=["doc_id", "label"]).to_pylist()
    of = {}
    for d in docs:
        of.setdefault(d["label"], []).append(d["doc_id"])
    rows = table.select(["query_id", "label"]).to_pylist()
    same = {r["query_id"]: of.get(r["label"], []) for r in rows}
    path = tmp_path / "same.json"
    path.write_text(json.dumps(same))
    args = ["eval", "--workdir", workdir, "--queries", data[1], "--model-dir", model_dir]
    out = CliRunner().invoke(app, [*args, "--judgments", str(path)])
    assert out.exit_code == 0, out.output
    assert "hits judged in" in out.output
    judged = json.loads(Path(workdir, "eval", "report.json").read_text())
    assert judged["relevance"] == "judgments" and report["relevance"] == "label"
    assert judged["n_queries"] == data[2] and judged["unjudged_queries"] == 0
    for m in METRICS:
        assert judged[m] == pytest.approx(report[m])
    assert "judged relevant in" in Path(workdir, "eval", "report.html").read_text()
    half = dict(list(same.items())[: data[2] // 2])
    path.write_text(json.dumps(half))
    out = CliRunner().invoke(app, [*args, "--judgments", str(path)])
    assert out.exit_code == 0, out.output
    judged = json.loads(Path(workdir, "eval", "report.json").read_text())
    assert judged["n_queries"] == len(half)
    assert judged["unjudged_queries"] == data[2] - len(half)
    path.write_text(json.dumps({"nobody": ["d0"]}))
    out = CliRunner().invoke(app, [*args, "--judgments", str(path)])
    assert out.exit_code == 2 and "no query is judged in" in out.output


def test_eval_refuses_a_missing_model(fused, data, tmp_path):
    args = ["eval", "--workdir", fused[0], "--queries", data[1], "--model-dir", str(tmp_path)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "no exported model" in refused.output
