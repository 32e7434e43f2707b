"""FAISS shards over the document embeddings: choose the index, train it once, build the shards
in parallel, keep them up to date.

``WORKDIR/index/`` holds ``shard-NNN.vV.faiss`` (one FAISS index per shard, global int64 ids,
inner product on L2-normalised vectors), ``documents.vV.parquet`` (``id``, ``shard``, ``doc_id``
and the metadata search returns) and ``manifest.json``: model version, dim, metric, factory,
search parameters, per-shard counts, sha256 checksums and deletions, and the index ``version``.
Files are never rewritten: a change writes new files (temporary name, then rename), then the
manifest, then deletes the files the manifest no longer names.

IVF shards share one quantiser, trained once (its k-means on the GPUs when the FAISS build has
them; the manifest's ``built.trained_on`` says where), and each owns whole inverted lists, so the
shards together scan exactly what one index would; flat and HNSW shards take contiguous id ranges.

``sync_index`` makes the index follow ``WORKDIR/embed``: it builds it, adds the documents embedded
since (to the shard owning their IVF list, else the smallest shard), deletes the ones gone
(``remove_ids`` where the index type supports it, else tombstones the search filters out), and
rebuilds from the embeddings when asked, when the model version changed, or when changes since
the build pass a threshold. The per-shard work is a plain function run through ``map_fn`` (Ray
tasks by default).
"""

# ruff: noqa: E741 -- FAISS naming: D, I are distances and ids
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from faiss.contrib.ivf_tools import add_preassigned

from oclear_ray import storage
from oclear_ray.embed import read_summary, remove_embeddings, summary_parts, vectors_of
from oclear_ray.search import (
    FORMAT,
    MANIFEST_FILE,
    bounded,
    check_bounds,
    file_sha256,
    ivf_of,
    load_shard,
    local_file,
    merge,
    normalize,
    read_manifest,
    shared_quantizer,
    tune,
)

METRIC = "inner_product"
FLAT_MAX = 20_000  # vectors per shard searched exactly: fast enough, nothing to train
HNSW_MAX = 200_000  # per shard; above, HNSW build time grows past IVF's
HNSW_M = 32
TUNE_QUERIES = 200
TUNE_K = 10
NPROBE_GRID = tuple(2**i for i in range(17))
EF_GRID = (16, 32, 64, 128, 256, 512)


@dataclass(kw_only=True)
class IndexConfig:
    """What index to build and when to rebuild it.

    ``shards=None`` keeps the existing shard count (1 for a new index); ``factory=None`` chooses
    from the size and ``memory_gb`` (the budget for all shards together). A rebuild happens when
    documents added plus deleted since the build exceed ``rebuild_fraction`` of those built.
    Search parameters are tuned at build time to reach ``target_recall`` (recall@10 of documents
    used as queries).
    """

    shards: int | None = bounded(None, ">= 1")
    factory: str | None = None
    memory_gb: float = bounded(8.0, "> 0")
    rebuild_fraction: float = bounded(0.3, "> 0")
    target_recall: float = 0.95
    threads_per_shard: int = bounded(1, ">= 1")
    seed: int = 0

    def __post_init__(self):
        check_bounds(self)
        if self.factory is not None and not self.factory.strip():
            raise ValueError(f"factory must be a FAISS factory string, got {self.factory!r}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")


# ---- choosing and training -------------------------------------------------------------------


def nlist_for(n: int) -> int:
    """IVF lists: the power of two nearest 4 sqrt(n), at least 16, and n / 39 at most (k-means
    wants ~39 training points per centroid)."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(n), 1)))
    cap = 2 ** int(math.log2(max(n // 39, 16)))
    return int(max(16, min(nlist, cap, 65536)))


def choose_factory(n: int, d: int, *, memory_bytes: float, shards: int = 1) -> str:
    """flat -> HNSW -> IVF-Flat -> IVF-PQ by vectors per shard and memory per shard.

    IVF shards share one quantiser trained on all ``n`` vectors, so ``nlist`` follows ``n``.
    """
    per_shard, budget = math.ceil(n / shards), memory_bytes / shards
    flat = per_shard * (4 * d + 8)
    if per_shard <= FLAT_MAX and flat <= budget:
        return "IDMap,Flat"
    if per_shard <= HNSW_MAX and per_shard * (4 * d + 8 * HNSW_M + 32) <= budget:
        return f"IDMap,HNSW{HNSW_M}"
    nlist = nlist_for(n)
    centroids = nlist * d * 4
    if flat + centroids <= budget:
        return f"IVF{nlist},Flat"
    for m in (d // 2, d // 4, d // 8, d // 16):
        if m >= 1 and d % m == 0 and per_shard * (m + 8) + centroids <= budget:
            return f"IVF{nlist},PQ{m}"
    raise ValueError(
        f"{n} vectors of dim {d} in {shards} shard(s) do not fit in "
        f"{memory_bytes / 2**30:.2f} GiB even as IVF-PQ; raise --memory-gb or use more shards"
    )


def make_index(factory: str, d: int) -> tuple[faiss.Index, str]:
    """An empty inner-product index and its factory string, with ``IDMap,`` in front when the
    index takes no ids itself (IVF indexes do)."""
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(exc).strip().splitlines()[-1])
        raise ValueError(f"invalid FAISS factory string {factory!r} for dim {d}: {detail}") from exc
    if faiss.try_extract_index_ivf(index) is None and not factory.startswith("IDMap"):
        return make_index(f"IDMap,{factory}", d)
    return index, factory


def train_size(index: faiss.Index, n: int) -> int:
    """Training sample size: none for untrained-free types, else ~40 points per IVF list."""
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    return min(n, max(40 * ivf.nlist if ivf is not None else 0, 20_000))


def gpu_clustering_index(ivf: faiss.IndexIVF | None) -> faiss.Index | None:
    """A flat index of ``ivf``'s metric on all GPUs, for the k-means of its coarse quantiser,
    when there is an IVF and this FAISS build sees GPUs; else None (k-means on the CPU)."""
    if ivf is None or faiss.get_num_gpus() == 0:
        return None
    return faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))


def train(index: faiss.Index, xt: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Train ``index`` on ``xt`` (normalised here) once: the serialised empty index, and where
    it was trained (``"gpu"``: the IVF k-means on the GPUs, ``"cpu"``; None: nothing to train)."""
    if index.is_trained:
        return faiss.serialize_index(index), None
    ivf = faiss.try_extract_index_ivf(index)
    clustering = gpu_clustering_index(ivf)
    if clustering is not None:
        ivf.clustering_index = clustering
    try:
        index.train(normalize(xt))
    finally:
        if clustering is not None:  # FAISS holds a raw pointer: drop it with the GPU index
            ivf.clustering_index = None
    return faiss.serialize_index(index), "cpu" if clustering is None else "gpu"


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[start, stop)`` id ranges covering ``range(n)``."""
    bounds = [n * i // shards for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


# ---- shard files (plain functions, run in Ray tasks) -------------------------------------------


def save_index(index: faiss.Index, path: str) -> str:
    """Write ``index`` to ``path`` (a local path or a URI), published whole, streamed through
    FAISS's callback writer (no copy of the index in memory); return its sha256."""
    with storage.open_output(path) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    return file_sha256(path)


def read_rows(parts: list[tuple[str, int]], rows: np.ndarray) -> np.ndarray:
    """Vectors of the global ``rows`` (sorted) of the concatenated ``(part path, part rows)``;
    only the parts holding some of them are read."""
    blocks, offset = [], 0
    for path, count in parts:
        mine = rows[(rows >= offset) & (rows < offset + count)] - offset
        if len(mine):
            fs, p = storage.resolve(path)
            table = pq.read_table(p, columns=["vector"], filesystem=fs)
            blocks.append(vectors_of(table.take(pa.array(mine))))
        offset += count
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def add_vectors(index: faiss.Index, x: np.ndarray, ids: np.ndarray, lists=None) -> None:
    """Add normalised ``x`` with global ``ids``; IVF vectors whose ``lists`` are known already
    skip the quantiser (``faiss.contrib.ivf_tools.add_preassigned``)."""
    if not len(x):
        return
    x, ids = normalize(x), np.ascontiguousarray(ids, dtype=np.int64)
    if lists is None:
        index.add_with_ids(x, ids)
        return
    add_preassigned(ivf_of(index), x, np.ascontiguousarray(lists, dtype=np.int64), ids)


def assign_lists(*, trained, parts, rows, threads: int = 1) -> np.ndarray:
    """IVF list of each vector of ``rows``, by the shared trained quantiser."""
    faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(np.asarray(trained))  # owns the quantiser: keep it
    return ivf_of(index).quantizer.assign(normalize(read_rows(parts, rows)), 1).ravel()


def list_owners(sizes: np.ndarray, shards: int) -> np.ndarray:
    """Shard owning each IVF list: largest lists first, each to the least-filled shard. A shard
    holds whole lists, so a probed list is scanned in one shard only: shards cost no more than
    one index (splitting every list over the shards costs a cold memory stream per shard)."""
    owner, load = np.zeros(len(sizes), np.int64), np.zeros(shards)
    for lst in np.argsort(-np.asarray(sizes), kind="stable"):
        owner[lst] = int(np.argmin(load))
        load[owner[lst]] += sizes[lst]
    return owner


def build_shard(
    *, trained, parts, rows, lists=None, out_path: str, queries=None, k: int = 0, threads: int = 1
) -> dict:
    """Add the vectors of global ``rows`` (their ids) to a copy of the trained index and write
    it. With ``queries``, also their exact top-``k`` in this shard (``gt_D``, ``gt_I``)."""
    faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(np.asarray(trained))
    xb = normalize(read_rows(parts, rows))
    ids = np.asarray(rows, dtype=np.int64)
    add_vectors(index, xb, ids, lists)
    result = {"vectors": int(index.ntotal), "sha256": save_index(index, out_path)}
    if queries is not None:
        result["gt_D"], result["gt_I"] = exact_top(queries, xb, ids, k)
    return result


def exact_top(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int):
    """Exact top-``k`` (inner product) of ``xq`` in ``xb`` as ``(D, I)`` with ``ids``, padded
    with (-max float, -1) past ``len(xb)``."""
    if not len(xb):
        return _pad(np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64), k)
    D, I = faiss.knn(normalize(xq), xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
    D, I = _pad(D, I, k)
    return D, np.where(I >= 0, ids[np.maximum(I, 0)], -1)


def update_shard(
    *, in_path: str, out_path: str, add=None, add_ids=None, lists=None, remove=None, threads=1
) -> dict:
    """Read a shard (not memory-mapped: it changes), remove ids where the type supports it,
    add vectors, write it under a new name. ``removed`` False: the ids need tombstones."""
    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(local_file(in_path))
    removed = True
    if remove is not None and len(remove):
        try:
            index.remove_ids(np.asarray(remove, dtype=np.int64))
        except RuntimeError:  # e.g. HNSW: FAISS cannot remove from the graph
            removed = False
    if add is not None and len(add):
        add_vectors(index, add, add_ids, lists)
    return {"vectors": int(index.ntotal), "sha256": save_index(index, out_path), "removed": removed}


def _pad(D: np.ndarray, I: np.ndarray, k: int):
    """Results padded to ``k`` columns with (-inf, -1) when a shard holds fewer vectors."""
    if D.shape[1] == k:
        return D, I
    extra = k - D.shape[1]
    D = np.hstack([D, np.full((len(D), extra), -np.finfo(np.float32).max, np.float32)])
    return D, np.hstack([I, np.full((len(I), extra), -1, np.int64)])


def ray_map(fn, jobs: list[dict], *, num_cpus: float = 1, progress=None) -> list:
    """Run ``fn(**job)`` for every job as Ray tasks; large arrays are put in the store once.
    ``progress(1)`` is called as each job finishes."""
    import ray

    remote = ray.remote(num_cpus=num_cpus)(fn)
    refs: dict[int, object] = {}

    def put(value):
        if isinstance(value, np.ndarray) and value.nbytes > 1 << 20:
            return refs.setdefault(id(value), ray.put(value))
        return value

    tasks = [remote.remote(**{k: put(v) for k, v in job.items()}) for job in jobs]
    pending = list(tasks)
    while progress is not None and pending:
        done, pending = ray.wait(pending)
        progress(len(done))
    return ray.get(tasks)


def local_map(fn, jobs: list[dict]) -> list:
    """``map_fn`` running the jobs one after the other in this process."""
    return [fn(**job) for job in jobs]


# ---- documents and samples --------------------------------------------------------------------


def _part_rows(parts: list[str]) -> list[int]:
    rows = []
    for path in parts:
        fs, p = storage.resolve(path)
        rows.append(pq.read_metadata(p, filesystem=fs).num_rows)
    return rows


def _documents_schema(parts: list[str]) -> pa.Schema:
    """``id``, ``shard``, then the union of the parts' metadata columns."""
    schemas = []
    for path in parts:
        fs, p = storage.resolve(path)
        schemas.append(pq.read_schema(p, filesystem=fs).remove_metadata())
    fields = [f for f in pa.unify_schemas(schemas) if f.name not in ("vector", "model_version")]
    return pa.schema([("id", pa.int64()), ("shard", pa.int32()), *fields])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _with_ids(table: pa.Table, ids: np.ndarray, shards: np.ndarray) -> pa.Table:
    table = table.append_column("id", pa.array(ids, pa.int64()))
    return table.append_column("shard", pa.array(shards, pa.int32()))


def write_documents(path: str, parts: list[str], schema: pa.Schema, shard_of: np.ndarray) -> dict:
    """The documents table: global ids in part order, each row's shard, the metadata."""
    sink, offset = storage.ParquetSink(path, schema), 0
    columns = [f.name for f in schema if f.name not in ("id", "shard")]
    for part in parts:
        fs, p = storage.resolve(part)
        names = pq.read_schema(p, filesystem=fs).names
        table = pq.read_table(p, columns=[c for c in columns if c in names], filesystem=fs)
        ids = np.arange(offset, offset + table.num_rows)
        sink.write(_conform(_with_ids(table, ids, shard_of[ids]), schema))
        offset += table.num_rows
    sink.close()
    return {"file": storage.basename(path), "rows": offset, "sha256": file_sha256(path)}


# ---- building ---------------------------------------------------------------------------------


def _file(kind: str, version: int, shard: int | None = None) -> str:
    if kind == "shard":
        return f"shard-{shard:03d}.v{version}.faiss"
    return f"documents.v{version}.parquet"


def _samples(n: int, index: faiss.Index, seed: int):
    """Sorted global rows to read in the documents pass, and within them the training rows
    and the tuning queries (documents searched for their neighbours, themselves left out)."""
    rng = np.random.default_rng(seed)
    nt, nq = train_size(index, n), min(TUNE_QUERIES, n)
    rows = np.sort(rng.choice(n, size=max(nt, nq), replace=False))
    return rows, rng.permutation(len(rows))[:nt], rng.choice(len(rows), size=nq, replace=False)


def _placement(index, trained, parts, ranges, *, shards: int, map_fn, threads: int):
    """``(shard of each global row, IVF list of each row or None, list owners or None)``:
    IVF shards own whole lists (assigned here by Ray tasks over row ranges); other index types
    take contiguous row ranges."""
    if ivf_of(index) is None:
        return np.repeat(np.arange(shards), [b - a for a, b in ranges]), None, None
    jobs = [
        dict(trained=trained, parts=parts, rows=np.arange(a, b), threads=threads) for a, b in ranges
    ]
    lists = np.concatenate(map_fn(assign_lists, jobs))
    owner = list_owners(np.bincount(lists, minlength=ivf_of(index).nlist), shards)
    return owner[lists], lists, owner


def build(index_dir: str, embed_dir: str, config: IndexConfig, *, version: int, map_fn) -> dict:
    """A new index from all embeddings: train once here, place rows on shards, build the shards
    through ``map_fn``, tune the search parameters; returns the manifest (not written yet)."""
    summary = read_summary(embed_dir)
    paths = summary_parts(embed_dir, summary)
    parts = list(zip(paths, _part_rows(paths), strict=True))
    n, d, shards = sum(c for _, c in parts), int(summary["dim"]), config.shards or 1
    if n < shards:
        raise ValueError(f"{shards} shards for {n} embedded documents: use fewer shards")
    memory = config.memory_gb * 2**30
    index, factory = make_index(
        config.factory or choose_factory(n, d, memory_bytes=memory, shards=shards), d
    )
    sample, train_rows, query_rows = _samples(n, index, config.seed)
    xs = read_rows(parts, sample)
    trained, trained_on = train(index, xs[train_rows])
    xq, own, threads = xs[query_rows], sample[query_rows], config.threads_per_shard
    ranges = shard_ranges(n, shards)
    shard_of, lists, owner = _placement(
        index, trained, parts, ranges, shards=shards, map_fn=map_fn, threads=threads
    )
    docs = storage.join(index_dir, _file("documents", version))
    documents = write_documents(docs, paths, _documents_schema(paths), shard_of)
    jobs = []
    for i in range(shards):
        rows = np.flatnonzero(shard_of == i)
        out = storage.join(index_dir, _file("shard", version, i))
        jobs.append(
            dict(
                trained=trained,
                parts=parts,
                rows=rows,
                lists=None if lists is None else lists[rows],
                out_path=out,
                queries=xq,
                k=TUNE_K + 1,
                threads=threads,
            )
        )
    results = map_fn(build_shard, jobs)
    manifest = new_manifest(summary, factory, index, config, results, documents, version=version)
    manifest["built"]["trained_on"] = trained_on
    manifest["list_owner"] = None if owner is None else owner.tolist()
    gt = merge([(r["gt_D"], r["gt_I"]) for r in results], TUNE_K + 1)[1]
    return manifest | _tuned(index_dir, manifest, xq, own, gt, config.target_recall)


def new_manifest(summary, factory, index, config, results, documents, *, version) -> dict:
    """The manifest of a fresh build (search parameters are added once tuned)."""
    count = documents["rows"]
    return {
        "format": FORMAT,
        "version": version,
        "model_version": summary["model_version"],
        "dim": int(summary["dim"]),
        "metric": METRIC,
        "factory": factory,
        "auto_factory": config.factory is None,
        "shared_quantizer": ivf_of(index) is not None,
        "count": count,
        "next_id": count,
        "built": {"version": version, "count": count},
        "since_build": {"added": 0, "deleted": 0},
        "documents": documents,
        "shards": [
            {
                "file": _file("shard", version, i),
                **_entry(r),
                "deleted": [],
                "filter_deleted": False,
            }
            for i, r in enumerate(results)
        ],
    }


def _entry(result: dict) -> dict:
    return {"vectors": result["vectors"], "sha256": result["sha256"]}


def _core(index: faiss.Index) -> faiss.Index:
    """The index under IDMap / pre-transform wrappers."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def _tuned(index_dir, manifest, xq, own, gt, target: float) -> dict:
    """Search parameters reaching ``target`` recall@10 on documents as queries (self excluded)."""
    shards = [load_shard(index_dir, e, verify=False)[0] for e in manifest["shards"]]
    core = _core(shards[0])
    if isinstance(core, faiss.IndexIVF):
        name, grid = "nprobe", [p for p in NPROBE_GRID if p <= core.nlist]
    elif isinstance(core, faiss.IndexHNSW):
        name, grid = "efSearch", list(EF_GRID)
    else:
        return {"search": {}, "tuned_recall": None}
    quantizer = shared_quantizer(shards) if manifest["shared_quantizer"] else None
    value, recall = tune(
        shards,
        normalize(xq),
        gt,
        name=name,
        grid=grid,
        quantizer=quantizer,
        own=own,
        k=TUNE_K,
        target=target,
    )
    return {"search": {name: int(value)}, "tuned_recall": round(float(recall), 4)}


# ---- incremental updates ----------------------------------------------------------------------


def _deleted(manifest: dict) -> pa.Array:
    return pa.array([i for e in manifest["shards"] for i in e["deleted"]], pa.int64())


def changes(index_dir: str, manifest: dict, parts: list[str]) -> tuple[pa.Table, pa.Table]:
    """``(new, gone)``: embedded rows the index lacks (all columns), and the index's live
    documents (``id``, ``shard``, ``doc_id``) no longer among the embeddings."""
    fs, p = storage.resolve(storage.join(index_dir, manifest["documents"]["file"]))
    docs = pq.read_table(p, columns=["id", "shard", "doc_id"], filesystem=fs)
    live = docs.filter(pc.invert(pc.is_in(docs.column("id"), value_set=_deleted(manifest))))
    known, new, embedded = live.column("doc_id").combine_chunks(), [], []
    for path in parts:
        fs, p = storage.resolve(path)
        ids = pq.read_table(p, columns=["doc_id"], filesystem=fs).column("doc_id")
        embedded.append(ids.combine_chunks())
        fresh = pc.invert(pc.is_in(ids, value_set=known))
        if pc.any(fresh).as_py():
            table = pq.read_table(p, filesystem=fs).replace_schema_metadata()
            new.append(table.filter(fresh))
    all_ids = pa.concat_arrays(embedded) if embedded else pa.array([], pa.string())
    gone = live.filter(pc.invert(pc.is_in(live.column("doc_id"), value_set=all_ids)))
    empty = pa.table({"doc_id": pa.array([], pa.string())})
    return pa.concat_tables(new, promote_options="default") if new else empty, gone


def _live_counts(manifest: dict) -> list[int]:
    return [e["vectors"] - len(e["deleted"]) * e["filter_deleted"] for e in manifest["shards"]]


def _route(index_dir: str, manifest: dict, new: pa.Table):
    """``(shard, IVF list or None)`` of each new row: the owner of its list for IVF shards,
    else the shard with the fewest live documents."""
    if manifest.get("list_owner") is None:
        target = int(np.argmin(_live_counts(manifest)))
        return np.full(new.num_rows, target), None
    shard, _ = load_shard(index_dir, manifest["shards"][0], verify=False)  # owns the quantiser
    lists = ivf_of(shard).quantizer.assign(normalize(vectors_of(new)), 1).ravel()
    return np.asarray(manifest["list_owner"])[lists], lists


def _shard_jobs(index_dir, manifest, new, gone, *, version: int, threads: int):
    """One ``update_shard`` job per shard that changes (its deletions and its new rows);
    returns ``(jobs, shard numbers, new ids, shard of each new row)``."""
    ids = np.arange(manifest["next_id"], manifest["next_id"] + new.num_rows, dtype=np.int64)
    dest, lists = _route(index_dir, manifest, new) if new.num_rows else (ids, None)
    x = vectors_of(new) if new.num_rows else None
    gone_ids, gone_shard = gone.column("id").to_numpy(), gone.column("shard").to_numpy()
    jobs, touched = [], []
    for i, entry in enumerate(manifest["shards"]):
        remove, mine = gone_ids[gone_shard == i], np.flatnonzero(dest == i)
        if len(remove) or len(mine):
            jobs.append(
                dict(
                    in_path=storage.join(index_dir, entry["file"]),
                    out_path=storage.join(index_dir, _file("shard", version, i)),
                    add=x[mine] if len(mine) else None,
                    add_ids=ids[mine],
                    lists=None if lists is None else lists[mine],
                    remove=remove,
                    threads=threads,
                )
            )
            touched.append(i)
    return jobs, touched, ids, dest


def update(index_dir, manifest, new, gone, *, version: int, map_fn, threads: int = 1) -> dict:
    """A new manifest version with ``new`` rows added and ``gone`` documents deleted."""
    m = json.loads(json.dumps(manifest))
    jobs, touched, ids, dest = _shard_jobs(
        index_dir, m, new, gone, version=version, threads=threads
    )
    for i, job, result in zip(touched, jobs, map_fn(update_shard, jobs), strict=True):
        entry = m["shards"][i]
        entry.update(file=_file("shard", version, i), **_entry(result))
        entry["deleted"] = sorted(entry["deleted"] + job["remove"].tolist())
        entry["filter_deleted"] = entry["filter_deleted"] or (
            len(job["remove"]) > 0 and not result["removed"]
        )
    if new.num_rows:
        m["documents"] = _append_documents(index_dir, m, new, ids, dest, version)
    m["version"], m["next_id"] = version, m["next_id"] + new.num_rows
    m["count"] = sum(_live_counts(m))
    m["since_build"]["added"] += new.num_rows
    m["since_build"]["deleted"] += gone.num_rows
    return m


def _append_documents(index_dir, manifest, new, ids, shards, version: int) -> dict:
    """The documents table with ``new`` appended, written as this version's file."""
    fs, p = storage.resolve(storage.join(index_dir, manifest["documents"]["file"]))
    old = pq.read_table(p, filesystem=fs)
    added = _with_ids(new.drop_columns(["vector", "model_version"]), ids, shards)
    schema = pa.unify_schemas([old.schema, added.schema.remove_metadata()])
    table = pa.concat_tables([_conform(old, schema), _conform(added, schema)])
    path = storage.join(index_dir, _file("documents", version))
    storage.write_parquet(path, [table], schema)
    return {"file": storage.basename(path), "rows": table.num_rows, "sha256": file_sha256(path)}


def write_manifest(index_dir: str, manifest: dict) -> None:
    """Write ``manifest.json`` (after every file it names), then delete unnamed old files."""
    text = json.dumps(manifest, indent=1, sort_keys=True)
    storage.write_bytes(storage.join(index_dir, MANIFEST_FILE), text.encode())
    keep = {manifest["documents"]["file"], *(e["file"] for e in manifest["shards"])}
    for path in storage.list_files(index_dir, (".faiss", ".parquet")):
        name = storage.basename(path)
        if name not in keep and name.startswith(("shard-", "documents.")):
            fs, p = storage.resolve(path)
            fs.delete_file(p)


# ---- the index stage ---------------------------------------------------------------------------


@dataclass
class SyncResult:
    """What ``sync_index`` did (``action``: built, updated or unchanged) and why."""

    action: str
    reason: str
    added: int
    deleted: int
    manifest: dict

    def to_dict(self) -> dict:
        m = self.manifest
        return {
            "action": self.action,
            "reason": self.reason,
            "added": self.added,
            "deleted": self.deleted,
            "version": m["version"],
            "count": m["count"],
            "factory": m["factory"],
            "shards": [s["vectors"] for s in m["shards"]],
            "search": m.get("search", {}),
            "tuned_recall": m.get("tuned_recall"),
            "trained_on": m["built"].get("trained_on"),
        }


def _rebuild_reason(manifest, summary, config: IndexConfig, rebuild: bool) -> str | None:
    """Why the index must be built from scratch, or None."""
    if manifest is None:
        return "no index yet"
    if rebuild:
        return "rebuild requested"
    if manifest["model_version"] != summary["model_version"]:
        return f"model version changed ({manifest['model_version']} -> {summary['model_version']})"
    if config.shards is not None and config.shards != len(manifest["shards"]):
        return f"shards changed ({len(manifest['shards'])} -> {config.shards})"
    if config.factory is not None and (
        manifest["auto_factory"]
        or make_index(config.factory, manifest["dim"])[1] != manifest["factory"]
    ):
        return f"factory changed ({manifest['factory']} -> {config.factory})"
    return None


def _threshold_reason(manifest: dict, changes: int, config: IndexConfig) -> str | None:
    """A rebuild is due when documents added plus deleted since the build pass the threshold
    (IVF lists trained on other data, tombstones searched past, the index type outgrown)."""
    since, built = manifest["since_build"], manifest["built"]["count"]
    changed = since["added"] + since["deleted"] + changes
    if changed <= config.rebuild_fraction * built:
        return None
    return (
        f"{changed} documents added or deleted since the build of {built} "
        f"(rebuild_fraction {config.rebuild_fraction})"
    )


def _build_config(manifest, config: IndexConfig) -> IndexConfig:
    """The config of a rebuild: unset shards / factory keep what the index had."""
    if manifest is None:
        return config
    shards = config.shards or len(manifest["shards"])
    keep = None if manifest["auto_factory"] else manifest["factory"]
    return dataclasses_replace(config, shards=shards, factory=config.factory or keep)


def _current(index_dir: str) -> dict | None:
    if not storage.exists(storage.join(index_dir, MANIFEST_FILE)):
        return None
    return read_manifest(index_dir)


def sync_index(
    workdir: str,
    config: IndexConfig | None = None,
    *,
    rebuild: bool = False,
    delete=(),
    map_fn=None,
    progress=None,
) -> SyncResult:
    """Make ``WORKDIR/index`` follow ``WORKDIR/embed`` (after deleting ``delete`` doc_ids from
    the embeddings): build, update in place, or rebuild; the manifest is written last.
    ``progress(1)`` is called as each shard task finishes."""
    config = config or IndexConfig()
    workdir = storage.absolute(workdir)  # Ray tasks do not run in this directory
    map_fn = map_fn or functools.partial(
        ray_map, num_cpus=config.threads_per_shard, progress=progress
    )
    embed_dir, index_dir = storage.join(workdir, "embed"), storage.join(workdir, "index")
    removed = remove_embeddings(embed_dir, delete) if delete else 0
    summary, manifest = read_summary(embed_dir), _current(index_dir)
    version = manifest["version"] + 1 if manifest else 1
    reason = _rebuild_reason(manifest, summary, config, rebuild)
    if reason is None:
        new, gone = changes(index_dir, manifest, summary_parts(embed_dir, summary))
        if not new.num_rows and not gone.num_rows:
            return SyncResult("unchanged", "index follows the embeddings", 0, 0, manifest)
        reason = _threshold_reason(manifest, new.num_rows + gone.num_rows, config)
        if reason is None:
            m = update(
                index_dir,
                manifest,
                new,
                gone,
                version=version,
                map_fn=map_fn,
                threads=config.threads_per_shard,
            )
            write_manifest(index_dir, m)
            return SyncResult("updated", "incremental", new.num_rows, gone.num_rows, m)
    m = build(index_dir, embed_dir, _build_config(manifest, config), version=version, map_fn=map_fn)
    write_manifest(index_dir, m)
    return SyncResult("built", reason, m["count"], removed, m)
