"""FAISS shards, merge, manifest checks and updates, against exact FAISS references (no Ray)."""

# ruff: noqa: E741 -- FAISS naming: D, I are distances and ids

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pytest
from faiss.contrib.evaluation import knn_intersection_measure

from oclear_ray.embed import (
    EmbedConfig,
    embedding_table,
    list_parts,
    part_path,
    read_parts,
    write_part,
    write_summary,
)
from oclear_ray.index import (
    IndexConfig,
    assign_lists,
    build_shard,
    choose_factory,
    list_owners,
    local_map,
    make_index,
    shard_ranges,
    sync_index,
    train,
)
from oclear_ray.search import (
    IndexRefused,
    SearchIndex,
    coarse_assign,
    knn_overlap,
    merge,
    normalize,
    read_manifest,
    search_parameters,
    search_shard,
)

D = 16


def blobs(n, *, centres=20, seed=0, d=D):
    """Unit vectors in Gaussian blobs around ``centres`` fixed random centres."""
    c = np.random.default_rng(12345).standard_normal((centres, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return normalize(x)


def write_embeddings(workdir, x, ids, *, version="mv1", rows_per_part=100, first_part=0):
    """Embedding parts and embed.json as the embed stage writes them."""
    out = os.path.join(workdir, "embed")
    for j, start in enumerate(range(0, len(ids), rows_per_part)):
        chunk = ids[start : start + rows_per_part]
        docs = pa.table(
            {
                "doc_id": chunk,
                "text": [f"title {i}" for i in chunk],
                "category": ["a/b"] * len(chunk),
                "label": [f"c{int(i[1:]) % 7}" for i in chunk],
                "price": [float(int(i[1:])) for i in chunk],
            }
        )
        vec = x[start : start + rows_per_part]
        write_part(part_path(out, first_part + j), embedding_table(docs, vec, version), version)
    write_summary(out, version, x.shape[1], {"catalog": "test"})


def doc_ids(n, start=0):
    return [f"d{i:05d}" for i in range(start, start + n)]


def sync(workdir, **kwargs):
    config = kwargs.pop("config", IndexConfig())
    return sync_index(str(workdir), config, map_fn=local_map, **kwargs)


def shard_files(workdir):
    return sorted(f for f in os.listdir(workdir / "index") if f.endswith(".faiss"))


# ---- pure functions against exact references --------------------------------------------------


def test_shard_ranges_are_balanced_and_cover_everything():
    ranges = shard_ranges(10, 3)
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    assert shard_ranges(2, 2) == [(0, 1), (1, 2)]


def _part(tmp_path, x):
    path = str(tmp_path / "part.parquet")
    write_part(path, embedding_table(pa.table({"doc_id": doc_ids(len(x))}), x, "v"), "v")
    return [(path, len(x))]


def _shards(tmp_path, trained, parts, placement, lists=None):
    """Shards built by ``build_shard`` from rows placed by ``placement`` (shard per row)."""
    out = []
    for i in range(placement.max() + 1):
        rows, path = np.flatnonzero(placement == i), str(tmp_path / f"s{i}.faiss")
        mine = None if lists is None else lists[rows]
        build_shard(trained=trained, parts=parts, rows=rows, lists=mine, out_path=path)
        out.append(faiss.read_index(path))
    return out


def test_sharded_flat_search_and_merge_equals_one_flat_index(tmp_path):
    x, xq = blobs(1000), blobs(50, seed=1)
    trained, trained_on = train(make_index("Flat", D)[0], x[:0])
    assert trained_on is None  # nothing to train
    placement = np.repeat(np.arange(3), [333, 333, 334])
    shards = _shards(tmp_path, trained, _part(tmp_path, x), placement)
    D_, I = merge([search_shard(s, xq, 10) for s in shards], 10)
    ref = faiss.IndexFlatIP(D)
    ref.add(x)
    D_ref, I_ref = ref.search(xq, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D_, D_ref, rtol=1e-5)


def test_ivf_shards_own_whole_lists_and_equal_one_ivf_index(tmp_path):
    x, xq = blobs(4000), blobs(50, seed=1)
    index, _ = make_index("IVF32,Flat", D)
    (trained, _), parts = train(index, x), _part(tmp_path, x)
    lists = assign_lists(trained=trained, parts=parts, rows=np.arange(4000))
    owner = list_owners(np.bincount(lists, minlength=32), 4)
    shards = _shards(tmp_path, trained, parts, owner[lists], lists)
    sizes = np.array([[s.invlists.list_size(lst) for lst in range(32)] for s in shards])
    assert ((sizes > 0).sum(axis=0) <= 1).all()  # every list lives in one shard
    counts = sizes.sum(axis=1)
    assert counts.sum() == 4000 and counts.max() - counts.min() <= sizes.max()
    one = faiss.deserialize_index(trained)
    one.add_with_ids(x, np.arange(4000))
    params = [search_parameters(s, {"nprobe": 4}) for s in shards]
    assign = coarse_assign(faiss.extract_index_ivf(shards[0]).quantizer, xq, 4)
    results = [
        search_shard(s, xq, 10, params=p, assign=assign)
        for s, p in zip(shards, params, strict=True)
    ]
    D_, I = merge(results, 10)
    D_ref, I_ref = one.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=4))
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D_, D_ref, rtol=1e-5)


def test_knn_overlap_gives_the_hand_written_measure_it_replaced():
    """FAISS's measure gives the share of ``k`` found that the hand-written count gave, with
    padding (-1) in the results and in the truth (the tuner's, for a few documents)."""
    rng = np.random.default_rng(0)
    gt = np.array([rng.permutation(15)[:10] for _ in range(40)])
    I = np.array([rng.permutation(15)[:10] for _ in range(40)])
    gt[:, 8:], I[rng.random(I.shape) < 0.2] = -1, -1
    want = sum(len(set(a) & set(b) - {-1}) for a, b in zip(I, gt, strict=True)) / (10 * 40)
    assert knn_overlap(I, gt, 10) == pytest.approx(want)
    assert knn_overlap(I[:0], gt[:0], 10) == 1.0


@pytest.mark.parametrize(
    ("n", "shards", "gib", "expected"),
    [
        (5_000, 1, 8, "IDMap,Flat"),
        (60_000, 3, 8, "IDMap,Flat"),  # 20k per shard
        (100_000, 1, 8, "IDMap,HNSW32"),
        (1_000_000, 1, 8, "IVF4096,Flat"),
        (1_000_000, 4, 8, "IVF4096,Flat"),  # 250k per shard: past HNSW_MAX
        (1_000_000, 1, 0.25, "IVF4096,PQ64"),
        (1_000_000, 1, 0.06, "IVF4096,PQ32"),
    ],
)
def test_choose_factory_by_size_and_memory(n, shards, gib, expected):
    assert choose_factory(n, 128, memory_bytes=gib * 2**30, shards=shards) == expected


def test_choose_factory_refuses_a_budget_nothing_fits():
    with pytest.raises(ValueError, match="do not fit in 0.00 GiB"):
        choose_factory(10_000_000, 128, memory_bytes=1e6)


def test_make_index_adds_idmap_where_needed_and_names_bad_factories():
    assert make_index("HNSW16", 8)[1] == "IDMap,HNSW16"
    assert make_index("IVF4,Flat", 8)[1] == "IVF4,Flat"
    with pytest.raises(ValueError, match="invalid FAISS factory string 'IVF,Nope'"):
        make_index("IVF,Nope", 8)


def test_configs_name_the_bad_value():
    with pytest.raises(ValueError, match="shards must be >= 1, got 0"):
        IndexConfig(shards=0)
    with pytest.raises(ValueError, match="memory_gb must be > 0, got -1"):
        IndexConfig(memory_gb=-1)
    with pytest.raises(ValueError, match="rows_per_part must be >= 1, got 0"):
        EmbedConfig(rows_per_part=0)
    with pytest.raises(ValueError, match="cpus_per_actor must be > 0, got 0"):
        EmbedConfig(cpus_per_actor=0)


# ---- the index stage over embedding parts -----------------------------------------------------


@pytest.fixture
def built(tmp_path):
    x, ids = blobs(600), doc_ids(600)
    write_embeddings(tmp_path, x, ids)
    result = sync(tmp_path, config=IndexConfig(shards=3))
    return tmp_path, x, ids, result


def test_build_indexes_every_embedding_once_with_metadata(built):
    workdir, x, ids, result = built
    m = result.manifest
    assert result.action == "built" and m["count"] == 600 and m["factory"] == "IDMap,Flat"
    assert [s["vectors"] for s in m["shards"]] == [200, 200, 200]
    assert m["model_version"] == "mv1" and m["dim"] == D and m["metric"] == "inner_product"
    index = SearchIndex.load(str(workdir / "index"), expected_model_version="mv1")
    assert index.notes == []  # every shard memory-mapped
    assert sorted(index.documents.column("doc_id").to_pylist()) == ids
    assert len(set(index.documents.column("id").to_pylist())) == 600
    hits = index.search_documents(x[[5, 450]], k=3)
    assert [h[0]["doc_id"] for h in hits] == [ids[5], ids[450]]
    assert hits[0][0]["text"] == f"title {ids[5]}" and hits[0][0]["price"] == 5.0
    assert hits[0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert sync(workdir).action == "unchanged"


def test_search_refuses_an_index_of_another_model_version(built):
    workdir = built[0]
    with pytest.raises(
        IndexRefused, match="index built with model version mv1, but the model in use is mv2"
    ):
        SearchIndex.load(str(workdir / "index"), expected_model_version="mv2")


def test_search_refuses_a_shard_whose_checksum_fails(built):
    workdir = built[0]
    path = workdir / "index" / "shard-001.v1.faiss"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexRefused, match=r"shard-001\.v1\.faiss checksum mismatch"):
        SearchIndex.load(str(workdir / "index"))


def test_delete_removes_vectors_where_faiss_can(built):
    workdir, x, ids, _ = built
    gone = [ids[3], ids[250]]
    result = sync(workdir, delete=gone)
    m = result.manifest
    assert result.action == "updated" and m["count"] == 598 and m["version"] == 2
    assert [s["vectors"] for s in m["shards"]] == [199, 199, 200]
    assert not any(s["filter_deleted"] for s in m["shards"])
    assert shard_files(workdir) == [
        "shard-000.v2.faiss",
        "shard-001.v2.faiss",
        "shard-002.v1.faiss",
    ]
    index = SearchIndex.load(str(workdir / "index"))
    found = {h["doc_id"] for hits in index.search_documents(x[[3, 250]], k=5) for h in hits}
    assert not found & set(gone)
    parts = read_parts(list_parts(str(workdir / "embed")), ["doc_id"])
    assert parts.num_rows == 598  # a rebuild will not bring them back


def test_delete_tombstones_what_faiss_cannot_remove(tmp_path):
    x, ids = blobs(600), doc_ids(600)
    write_embeddings(tmp_path, x, ids)
    config = IndexConfig(shards=2, factory="HNSW16")
    assert sync(tmp_path, config=config).manifest["factory"] == "IDMap,HNSW16"
    m = sync(tmp_path, delete=[ids[0], ids[1], ids[400]]).manifest
    assert [s["filter_deleted"] for s in m["shards"]] == [True, True]
    assert [s["vectors"] for s in m["shards"]] == [300, 300]  # still in the graph
    assert m["shards"][0]["deleted"] == [0, 1] and m["count"] == 597
    index = SearchIndex.load(str(tmp_path / "index"))
    D, I = index.search(x[[0, 1, 400]], k=10)
    assert not set(I.ravel()) & {0, 1, 400} and (I >= 0).all()


def test_add_embeds_only_new_documents_into_the_smallest_shard(built):
    workdir, x, ids, _ = built
    sync(workdir, delete=[ids[450]])  # shard 2 is now the smallest
    extra, new_ids = blobs(40, seed=3), doc_ids(40, start=600)
    write_embeddings(workdir, extra, new_ids, first_part=10)
    result = sync(workdir)
    m = result.manifest
    assert result.action == "updated" and result.added == 40 and m["count"] == 639
    assert [s["vectors"] for s in m["shards"]] == [200, 200, 239]
    assert m["next_id"] == 640 and m["since_build"] == {"added": 40, "deleted": 1}
    index = SearchIndex.load(str(workdir / "index"))
    assert index.documents.num_rows == 640
    hits = index.search_documents(extra[:2], k=1)
    assert [h[0]["doc_id"] for h in hits] == new_ids[:2]
    assert {h[0]["id"] for h in hits} <= set(range(600, 640))


def test_many_changes_trigger_a_rebuild_that_forgets_deletions(built):
    workdir, x, ids, _ = built
    result = sync(workdir, delete=ids[:200], config=IndexConfig(rebuild_fraction=0.3))
    m = result.manifest
    assert result.action == "built" and "rebuild_fraction" in result.reason
    assert m["count"] == 400 and m["built"] == {"version": 2, "count": 400, "trained_on": None}
    assert all(s["deleted"] == [] for s in m["shards"]) and len(m["shards"]) == 3
    assert shard_files(workdir) == [f"shard-00{i}.v2.faiss" for i in range(3)]
    assert sorted(os.listdir(workdir / "index")) == sorted(
        ["manifest.json", "documents.v2.parquet", *shard_files(workdir)]
    )


def test_new_model_version_rebuilds(built):
    workdir, x, ids, _ = built
    for part in list_parts(str(workdir / "embed")):
        os.remove(part)
    write_embeddings(workdir, x[:300], ids[:300], version="mv2")
    result = sync(workdir)
    assert result.action == "built" and "mv1 -> mv2" in result.reason
    assert read_manifest(str(workdir / "index"), "mv2")["count"] == 300


def ivf_recall(workdir, x) -> float:
    """recall@10 of the index in ``workdir`` against exact search over ``x`` (``blobs`` around
    50 centres), for new points around the same centres."""
    index = SearchIndex.load(str(workdir / "index"))
    xq = blobs(100, centres=50, seed=1)
    exact = faiss.IndexFlatIP(D)
    exact.add(x)
    _, I_ref = exact.search(xq, 10)
    _, I = index.search(xq, 10)
    return knn_intersection_measure(I, I_ref)


def test_ivf_index_is_tuned_and_adds_go_to_the_owner_of_their_list(tmp_path):
    x, ids = blobs(4000, centres=50), doc_ids(4000)
    write_embeddings(tmp_path, x, ids, rows_per_part=1000)
    m = sync(tmp_path, config=IndexConfig(shards=2, factory="IVF32,Flat")).manifest
    assert m["shared_quantizer"] and m["tuned_recall"] >= 0.95 and len(m["list_owner"]) == 32
    index = SearchIndex.load(str(tmp_path / "index"))
    assert ivf_recall(tmp_path, x) >= 0.9
    extra = blobs(30, centres=50, seed=2)
    write_embeddings(tmp_path, extra, doc_ids(30, start=4000), first_part=10)
    m = sync(tmp_path).manifest
    assert m["count"] == 4030 and m["version"] == 2
    docs = SearchIndex.load(str(tmp_path / "index")).documents.slice(4000)
    lists = index.quantizer.assign(extra, 1).ravel()
    assert docs.column("shard").to_pylist() == [m["list_owner"][lst] for lst in lists]


def test_ivf_quantizer_trains_where_faiss_has_gpus_here_the_cpu(tmp_path):
    x = blobs(1000, centres=50)
    write_embeddings(tmp_path, x, doc_ids(1000), rows_per_part=500)
    result = sync(tmp_path, config=IndexConfig(factory="IVF16,Flat"))
    device = "gpu" if faiss.get_num_gpus() else "cpu"  # "cpu" on a faiss-cpu build
    assert result.manifest["built"]["trained_on"] == result.to_dict()["trained_on"] == device


def test_ivf_quantizer_trains_on_the_gpus_when_faiss_has_them(tmp_path, monkeypatch):
    clones = []

    def to_all_gpus(index):  # a CPU flat index stands in for the GPU copy
        clones.append(faiss.IndexFlat(index.d, index.metric_type))
        return clones[-1]

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus)
    x = blobs(1000, centres=50)
    write_embeddings(tmp_path, x, doc_ids(1000), rows_per_part=500)
    result = sync(tmp_path, config=IndexConfig(factory="IVF16,Flat"))
    (clone,) = clones
    assert clone.metric_type == faiss.METRIC_INNER_PRODUCT and clone.d == D
    assert clone.ntotal == 16  # the k-means ran on it: it holds the final centroids
    assert result.manifest["built"]["trained_on"] == result.to_dict()["trained_on"] == "gpu"
    assert result.manifest["tuned_recall"] >= 0.95 and ivf_recall(tmp_path, x) >= 0.9


def test_index_refuses_incomplete_embeddings(tmp_path):
    write_embeddings(tmp_path, blobs(10), doc_ids(10))
    os.remove(tmp_path / "embed" / "embed.json")
    with pytest.raises(FileNotFoundError, match="no complete embeddings"):
        sync(tmp_path)


def test_manifest_is_plain_json_with_checksums(built):
    m = json.loads((built[0] / "index" / "manifest.json").read_text())
    assert {"version", "model_version", "dim", "metric", "factory", "shards", "documents"} <= set(m)
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
