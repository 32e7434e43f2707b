"""Search FAISS shards and merge: the read side of ``WORKDIR/index`` (see ``oclear_ray.index``).

Small functions over arrays (``xq, k, D, I``) that a serving layer can place apart: a shard
replica needs ``load_shard`` + ``search_shard``; the ingress needs ``coarse_assign`` (IVF shards
share one trained quantiser, so queries are assigned to lists once), ``merge`` and ``lookup``.
``SearchIndex`` puts them together in one process. Loading refuses an index built by another
model version or whose files do not match the manifest's checksums.
"""

# ruff: noqa: E741 -- FAISS naming: D, I are distances and ids
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field, fields

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from faiss.contrib.evaluation import knn_intersection_measure

from oclear_ray import storage

FORMAT = "oclear-ray/index/v1"
MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 22


class IndexRefused(ValueError):
    """The index cannot be used: another model version, a checksum mismatch, another format."""


#: the bounds ``bounded`` fields take, and how each is checked
BOUNDS = {">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0}


def bounded(default, bound: str):
    """A dataclass field with ``default`` that ``check_bounds`` holds to ``bound`` (a key of
    ``BOUNDS``: counts ``>= 1``, sizes and CPUs ``> 0``, waits ``>= 0``)."""
    return field(default=default, metadata={"bound": bound})


def check_bounds(config) -> None:
    """A ``ValueError`` naming the first ``bounded`` field of ``config`` out of its bound (None,
    unset, passes). Here because the index's and the serving app's configs both build on this
    module."""
    for f in fields(config):
        bound, value = f.metadata.get("bound"), getattr(config, f.name)
        if bound is not None and value is not None and not BOUNDS[bound](value):
            raise ValueError(f"{f.name} must be {bound}, got {value}")


def normalize(x) -> np.ndarray:
    """A float32 C-contiguous L2-normalised copy of ``x`` [n, d] (inner product = cosine)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True, ndmin=2)
    faiss.normalize_L2(x)
    return x


def file_sha256(path: str) -> str:
    """sha256 of a local file or URI, streamed."""
    digest = hashlib.sha256()
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_file(path: str) -> str:
    """A local path for FAISS to read (and memory-map): URIs are downloaded to a temp cache."""
    if not storage.is_uri(path):
        return path
    cache = os.path.join(tempfile.gettempdir(), "oclear-index")
    os.makedirs(cache, exist_ok=True)
    local = os.path.join(cache, hashlib.sha1(path.encode()).hexdigest() + ".faiss")
    storage.write_bytes(local, storage.read_bytes(path))
    return local


def read_manifest(index_dir: str, expected_model_version: str | None = None) -> dict:
    """``manifest.json``, refused when of another format or built with another model version."""
    path = storage.join(index_dir, MANIFEST_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"no index at {index_dir}: {MANIFEST_FILE} is missing")
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != FORMAT:
        raise IndexRefused(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    built = manifest.get("model_version")
    if expected_model_version is not None and built != expected_model_version:
        raise IndexRefused(
            f"index built with model version {built}, but the model in use is "
            f"{expected_model_version}: rebuild it (`oclear embed` then `oclear index`)"
        )
    return manifest


def verify_file(index_dir: str, entry: dict) -> str:
    """The path of ``entry["file"]`` after checking its sha256 against the manifest."""
    path = storage.join(index_dir, entry["file"])
    if not storage.exists(path):
        raise IndexRefused(f"{entry['file']} is missing from {index_dir}")
    if file_sha256(path) != entry["sha256"]:
        raise IndexRefused(f"{entry['file']} checksum mismatch (corrupt, or replaced)")
    return path


def read_index(path: str, *, mmap: bool = True) -> tuple[faiss.Index, str | None]:
    """Read a FAISS index, memory-mapped when asked and the type allows; ``(index, note)``.

    Memory-mapped indexes are read-only: never add to or remove from one.
    """
    local = local_file(path)
    if not mmap:
        return faiss.read_index(local), None
    # MMAP_IFC (FAISS >= 1.10) maps flat codes and IVF lists; MMAP alone only IVF lists
    flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
    try:
        return faiss.read_index(local, flags), None
    except RuntimeError as exc:
        note = f"{os.path.basename(path)}: not memory-mapped ({str(exc).splitlines()[0]})"
        return faiss.read_index(local), note


def load_shard(
    index_dir: str, entry: dict, *, mmap: bool = True, verify: bool = True
) -> tuple[faiss.Index, str | None]:
    """One shard of a manifest, its checksum verified; ``(index, note)`` as ``read_index``."""
    path = verify_file(index_dir, entry) if verify else storage.join(index_dir, entry["file"])
    return read_index(path, mmap=mmap)


def load_documents(index_dir: str, manifest: dict, *, verify: bool = True) -> pa.Table:
    """The id -> document metadata table, sorted by id."""
    entry = manifest["documents"]
    path = verify_file(index_dir, entry) if verify else storage.join(index_dir, entry["file"])
    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs).sort_by("id")


def search_parameters(index: faiss.Index, values: dict, exclude=None) -> faiss.SearchParameters:
    """Typed search parameters for ``index`` (nprobe / efSearch from ``values``), excluding the
    ids in ``exclude`` (tombstones) through an ``IDSelectorNot``."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        inner = search_parameters(index.index, values, exclude)
        return faiss.SearchParametersPreTransform(index_params=inner)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return search_parameters(index.index, values, exclude)  # IDMap translates the selector
    kwargs = {}
    if exclude is not None and len(exclude):
        batch = faiss.IDSelectorBatch(np.asarray(exclude, dtype=np.int64))
        kwargs["sel"] = faiss.IDSelectorNot(batch)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(values.get("nprobe", index.nprobe)), **kwargs)
    if isinstance(index, faiss.IndexHNSW):
        ef = int(values.get("efSearch", index.hnsw.efSearch))
        return faiss.SearchParametersHNSW(efSearch=ef, **kwargs)
    return faiss.SearchParameters(**kwargs)


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """``index`` itself when it is a plain IVF index (searchable with preassigned lists)."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def coarse_assign(quantizer: faiss.Index, xq: np.ndarray, nprobe: int):
    """Assign queries to their ``nprobe`` nearest IVF lists once for all shards: ``(Dq, Iq)``."""
    return quantizer.search(xq, nprobe)


def search_shard(index: faiss.Index, xq: np.ndarray, k: int, *, params=None, assign=None):
    """Top-``k`` of one shard: ``(D, I)`` with global ids. ``assign``: ``coarse_assign``'s
    ``(Dq, Iq)`` for IVF shards (``params`` then a ``SearchParametersIVF`` or None)."""
    if assign is None:
        return index.search(xq, k, params=params)
    Dq, Iq = (np.ascontiguousarray(a) for a in assign)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    D = np.empty((len(xq), k), dtype=np.float32)
    I = np.empty((len(xq), k), dtype=np.int64)
    params = params or faiss.SearchParametersIVF(nprobe=Iq.shape[1])
    if params.nprobe != Iq.shape[1]:
        raise ValueError(f"nprobe {params.nprobe} does not match {Iq.shape[1]} assigned lists")
    ptr = faiss.swig_ptr  # the Python wrapper of search_preassigned takes no params (selector)
    ivf_of(index).search_preassigned_c(
        len(xq), ptr(xq), k, ptr(Iq), ptr(Dq.astype(np.float32)), ptr(D), ptr(I), False, params
    )
    return D, I


def merge(results, k: int):
    """Merge per-shard ``(D, I)`` results (inner product: larger is better) into the top-``k``."""
    Ds = np.stack([np.asarray(D, dtype=np.float32)[:, :k] for D, _ in results])
    Is = np.stack([np.asarray(I, dtype=np.int64)[:, :k] for _, I in results])
    return faiss.merge_knn_results(Ds, Is, keep_max=True)


def lookup(documents: pa.Table, D: np.ndarray, I: np.ndarray) -> list[list[dict]]:
    """Result rows: per query, the documents (metadata and ``score``) best first."""
    ids = documents.column("id").to_numpy()
    out = []
    for scores, hits in zip(D, I, strict=True):
        keep = hits >= 0
        rows = np.searchsorted(ids, hits[keep])
        found = documents.take(pa.array(rows)).to_pylist()
        for doc, score in zip(found, scores[keep], strict=True):
            doc["score"] = float(score)
        out.append(found)
    return out


def knn_overlap(I, gt, k: int) -> float:
    """ANN recall against exact search (not ``evaluate.recall_at``, the share of queries whose
    top k holds a relevant document): the true top-``k`` ids (``gt``) found in the top-``k``
    of ``I``, over ``k`` per query (``knn_intersection_measure``; padding ids -1 never match).
    Fewer than ``k`` columns (exact search over fewer documents): over those."""
    if not len(I):
        return 1.0
    truth = np.asarray(gt, dtype=np.int64)[:, :k]
    found = np.asarray(I, dtype=np.int64)[:, : truth.shape[1]]
    return knn_intersection_measure(np.where(found < 0, -2, found), truth)  # -1 in both: no hit


def drop_ids(I: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Per row, the first ``k`` ids other than ``own[row]`` (a database vector used as query)."""
    rows = [[i for i in row if i != o][:k] for row, o in zip(I.tolist(), own.tolist(), strict=True)]
    return np.array([r + [-1] * (k - len(r)) for r in rows], dtype=np.int64)


@dataclass
class SearchIndex:
    """All shards of an index in one process, with the document metadata."""

    manifest: dict
    shards: list
    params: list
    documents: pa.Table
    quantizer: faiss.Index | None = None
    notes: list = field(default_factory=list)

    @classmethod
    def load(
        cls,
        index_dir: str,
        expected_model_version: str | None = None,
        *,
        mmap: bool = True,
        verify: bool = True,
    ) -> SearchIndex:
        """Load the manifest, checksum-verified shards (memory-mapped) and the documents."""
        manifest = read_manifest(index_dir, expected_model_version)
        shards, notes = [], []
        for entry in manifest["shards"]:
            index, note = load_shard(index_dir, entry, mmap=mmap, verify=verify)
            shards.append(index)
            notes += [note] if note else []
        for note in notes:
            warnings.warn(note, stacklevel=2)
        values = manifest.get("search", {})
        params = [
            search_parameters(s, values, e["deleted"] if e["filter_deleted"] else None)
            for s, e in zip(shards, manifest["shards"], strict=True)
        ]
        quantizer = shared_quantizer(shards) if manifest.get("shared_quantizer") else None
        documents = load_documents(index_dir, manifest, verify=verify)
        return cls(manifest, shards, params, documents, quantizer, notes)

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    def search(self, xq, k: int = 10):
        """``(D, I)`` [nq, k] over all shards; ids are global, -1 past the last result."""
        return search_all(
            self.shards, normalize(xq), k, params=self.params, quantizer=self.quantizer
        )

    def search_documents(self, xq, k: int = 10) -> list[list[dict]]:
        """Per query, the top-``k`` documents with their metadata and ``score``."""
        D, I = self.search(xq, k)
        return lookup(self.documents, D, I)


def shared_quantizer(shards: list) -> faiss.Index | None:
    """The coarse quantiser shared by IVF shards (trained once), else None."""
    ivfs = [ivf_of(s) for s in shards]
    return ivfs[0].quantizer if all(i is not None for i in ivfs) else None


def search_all(shards, xq, k: int, *, params, quantizer=None):
    """Search every shard (preassigned when they share a quantiser) and merge the top-``k``."""
    assign = None
    if quantizer is not None:
        assign = coarse_assign(quantizer, xq, params[0].nprobe)
    results = [
        search_shard(s, xq, k, params=p, assign=assign) for s, p in zip(shards, params, strict=True)
    ]
    return merge(results, k)


def tune(
    shards,
    xq,
    gt,
    *,
    name: str,
    grid,
    quantizer=None,
    own=None,
    k: int = 10,
    target: float = 0.95,
):
    """Smallest ``name`` (nprobe, efSearch) in ``grid`` whose recall@k against ``gt`` reaches
    ``target``: ``(value, recall)``. When none does (e.g. PQ codes cap the recall), the smallest
    value within 0.005 of the best recall seen.

    ``own`` are the queries' own ids when they are database vectors: they are left out of both
    the results and ``gt``.
    """
    width = k + (own is not None)
    truth = drop_ids(gt, own, k) if own is not None else gt
    seen = []
    for value in grid:
        params = [search_parameters(s, {name: value}) for s in shards]
        _, I = search_all(shards, xq, width, params=params, quantizer=quantizer)
        recall = knn_overlap(drop_ids(I, own, k) if own is not None else I, truth, k)
        if recall >= target:
            return value, recall
        seen.append((value, recall))
    best = max(r for _, r in seen)
    return next((v, r) for v, r in seen if r >= best - 0.005)
