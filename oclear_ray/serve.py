"""Library side of the serving app (``serve/``): query decoding under limits, the version check,
a shard searcher with a category filter, and document thumbnails. No Ray, no HTTP here.

Errors a client caused are ``QueryError`` with the HTTP status they map to (400 not an image or
truncated, 413 over the byte or pixel limit, 415 not a form or JSON, 422 bad parameters, 503
the index not loaded yet); its ``reason`` names the status in the app's metrics.
"""

# ruff: noqa: E741 -- FAISS naming: D, I are distances and ids
from __future__ import annotations

import base64
import binascii
import io
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from oclear_ray import storage
from oclear_ray.contract import Limits
from oclear_ray.embed import read_summary
from oclear_ray.evaluate import thumbnail
from oclear_ray.preprocess import PreprocessConfig, fit_image, to_rgb
from oclear_ray.search import (
    load_documents,
    load_shard,
    lookup,
    read_manifest,
    search_parameters,
)

MAX_K = 100
MAX_TEXT = 1000
HIT_FIELDS = ("doc_id", "text", "category", "label", "score")


#: the reason a refused query is counted under, by its HTTP status
REASONS = {
    400: "unreadable",
    404: "not_found",
    413: "too_large",
    415: "unsupported_type",
    422: "bad_parameters",
    503: "not_ready",
}


class QueryError(ValueError):
    """A bad request: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @property
    def reason(self) -> str:
        return REASONS.get(self.status, str(self.status))


class VersionMismatch(RuntimeError):
    """The exported model and the index were not made by the same model version."""


@dataclass(frozen=True)
class Paths:
    """Where the app reads from inside a work directory."""

    workdir: str
    model_dir: str
    index_dir: str

    @classmethod
    def of(cls, workdir: str, model_dir: str | None = None) -> Paths:
        workdir = storage.absolute(workdir)
        model_dir = storage.absolute(model_dir or storage.join(workdir, "train", "model"))
        return cls(workdir, model_dir, storage.join(workdir, "index"))


def check_versions(paths: Paths) -> tuple[dict, dict]:
    """``(model manifest, index manifest)``; ``VersionMismatch`` when their versions differ."""
    from oclear_ray.export import read_manifest as read_model

    model = read_model(paths.model_dir)
    index = read_manifest(paths.index_dir)
    if model["model_version"] != index["model_version"]:
        raise VersionMismatch(
            f"model {paths.model_dir} is version {model['model_version']} but the index "
            f"{paths.index_dir} was built with {index['model_version']}: re-embed and re-index "
            "with this model (`oclear embed`, `oclear index`), or serve the matching model"
        )
    return model, index


# ---- queries ----------------------------------------------------------------------------------


def decode_base64(value: str, limits: Limits) -> bytes:
    """Bytes of a base64 (optionally ``data:`` URL) string, refused over ``max_bytes``."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) * 3 // 4 > limits.max_bytes + 3:
        raise QueryError(413, f"image over byte limit (> {limits.max_bytes} bytes)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise QueryError(400, f"image is not valid base64: {exc}") from exc


def open_query_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode an uploaded image; the pixel count is checked from the header, before decoding."""
    if not data:
        raise QueryError(400, "empty image upload")
    if len(data) > limits.max_bytes:
        raise QueryError(413, f"image over byte limit ({len(data)} > {limits.max_bytes} bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise QueryError(413, f"image over pixel limit: {exc}") from exc
    except Exception as exc:  # PIL raises many types for bytes that are not an image
        raise QueryError(400, f"not an image: {type(exc).__name__}: {exc}") from exc
    if width * height > limits.max_pixels:
        raise QueryError(
            413, f"image over pixel limit ({width}x{height} > {limits.max_pixels} pixels)"
        )
    try:
        img.load()
    except Exception as exc:
        raise QueryError(400, f"truncated or corrupt image: {type(exc).__name__}: {exc}") from exc
    return img


def decodes_quickly(data: bytes, max_pixels: int = 1 << 20) -> bool:
    """Whether an upload is a readable image header of at most ``max_pixels`` (about a
    millisecond to decode: fine on an event loop; larger ones are decoded in a thread)."""
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # not an image, or a bomb: query_pixels says which, in a thread
        return False
    return width * height <= max_pixels


def query_pixels(data: bytes, limits: Limits, preprocess: PreprocessConfig) -> np.ndarray:
    """Uploaded bytes -> uint8 [S, S, 3], resized and cropped as the encoder's export says."""
    return fit_image(to_rgb(open_query_image(data, limits)), preprocess)


def parse_k(value) -> int:
    """``k`` from a form field or JSON value: an integer in [1, MAX_K], else 422."""
    if isinstance(value, bool):
        raise QueryError(422, f"k must be an integer in [1, {MAX_K}], got {value!r}")
    try:
        k = int(value) if isinstance(value, int | str) else None
    except ValueError:
        k = None
    if k is None or not 1 <= k <= MAX_K:
        raise QueryError(422, f"k must be an integer in [1, {MAX_K}], got {value!r}")
    return k


def parse_text(value) -> str | None:
    """A text query: a string of at most ``MAX_TEXT`` characters; blank means none."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise QueryError(422, f"text must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise QueryError(422, f"text over {MAX_TEXT} characters ({len(value)})")
    return value.strip() or None


def parse_category(value) -> str | None:
    """A category prefix filter (``a/b``); blank means none."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 500:
        raise QueryError(422, "category must be a string of at most 500 characters")
    return value.strip().strip("/") or None


# ---- one shard --------------------------------------------------------------------------------


class ShardSearcher:
    """One FAISS shard of a manifest, searched with its tuned parameters, optionally filtered to
    the documents whose category starts with a prefix (an ``IDSelector`` built once per prefix).
    """

    def __init__(self, index_dir: str, shard: int, expected_model_version: str, *, cache=64):
        manifest = read_manifest(index_dir, expected_model_version)
        if not 0 <= shard < len(manifest["shards"]):
            raise ValueError(f"shard {shard} not in index of {len(manifest['shards'])} shards")
        self.manifest, self.shard = manifest, shard
        self.entry = manifest["shards"][shard]
        self.index, _ = load_shard(index_dir, self.entry)
        self.values = manifest.get("search", {})
        self.deleted = self.entry["deleted"] if self.entry["filter_deleted"] else []
        docs = load_documents(index_dir, manifest).select(["id", "shard", "category"])
        mine = docs.filter(pc.equal(docs.column("shard"), shard))
        self.ids = mine.column("id").to_numpy()
        self.categories = pc.fill_null(mine.column("category"), "").combine_chunks()
        self.params = {None: search_parameters(self.index, self.values, self.deleted or None)}
        self.cache = cache
        self.lock = threading.Lock()

    @property
    def info(self) -> dict:
        return {
            "shard": self.shard,
            "vectors": int(self.index.ntotal),
            "index_version": self.manifest["version"],
            "model_version": self.manifest["model_version"],
        }

    def _params(self, category: str | None):
        with self.lock:
            if category in self.params:
                self.params[category] = self.params.pop(category)  # most recently used last
                return self.params[category]
        match = pc.or_(
            pc.equal(self.categories, category),
            pc.starts_with(self.categories, category + "/"),
        )
        excluded = np.concatenate([self.ids[~match.to_numpy(zero_copy_only=False)], self.deleted])
        params = search_parameters(self.index, self.values, excluded.astype(np.int64))
        with self.lock:
            self.params[category] = params
            while len(self.params) > self.cache + 1:
                del self.params[next(k for k in self.params if k is not None)]
        return params

    def search(self, xq: np.ndarray, k: int, category: str | None = None):
        """``(D, I)`` [nq, k], global ids, -1 past the last match."""
        xq = np.ascontiguousarray(xq, dtype=np.float32).reshape(-1, self.index.d)
        return self.index.search(xq, k, params=self._params(category))


def hits_of(documents: pa.Table, D: np.ndarray, I: np.ndarray, *, thumbnails=None) -> list[dict]:
    """One query's merged ``(D, I)`` row -> its hits with metadata, best first."""
    hits = []
    for rank, doc in enumerate(lookup(documents, D[None], I[None])[0], 1):
        hit = {"rank": rank, **{f: doc.get(f) for f in HIT_FIELDS}}
        if thumbnails is not None and thumbnails.has(doc["doc_id"]):
            hit["thumbnail_url"] = thumbnails.url(doc["doc_id"])
        hits.append(hit)
    return hits


# ---- thumbnails -------------------------------------------------------------------------------


def embedded_catalog(workdir: str) -> str | None:
    """The catalog the embeddings were made from (``embed.read_summary``), when still readable;
    None without complete embeddings (thumbnails are decoration)."""
    try:
        catalog = read_summary(storage.join(workdir, "embed")).get("catalog")
    except (FileNotFoundError, ValueError):
        return None
    return catalog if catalog and storage.exists(catalog) else None


class Thumbnails:
    """Small JPEG thumbnails of documents (``evaluate.thumbnail``), from their ``image_path``
    metadata or, for a parquet catalog with image bytes, from the catalog the index was
    embedded from.

    The catalog's ``doc_id`` column is read once (by row group); an image is then read from its
    row group on demand and kept in a bounded LRU cache.
    """

    def __init__(self, documents: pa.Table, catalog: str | None, *, size=128, cache=2048):
        self.size, self.cache_size = size, cache
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.lock = threading.Lock()
        self.paths = {}
        if "image_path" in documents.column_names:
            ids, paths = (documents.column(c).to_pylist() for c in ("doc_id", "image_path"))
            self.paths = {d: p for d, p in zip(ids, paths, strict=True) if p}
        self.rows, self.groups = {}, []
        if catalog is not None and _is_parquet(catalog):
            self._index_catalog(catalog)

    def _index_catalog(self, catalog: str) -> None:
        import pyarrow.dataset as pads

        fs, path = storage.resolve(catalog)
        dataset = pads.dataset(path, format="parquet", filesystem=fs)
        if "image" not in dataset.schema.names:
            return
        for fragment in dataset.get_fragments():
            for group in fragment.split_by_row_group():
                ids = group.to_table(columns=["doc_id"]).column("doc_id").to_pylist()
                number = len(self.groups)
                self.groups.append(group)
                for row, doc_id in enumerate(ids):
                    self.rows.setdefault(doc_id, (number, row))

    def has(self, doc_id: str) -> bool:
        return doc_id in self.paths or doc_id in self.rows

    @staticmethod
    def url(doc_id: str) -> str:
        from urllib.parse import quote

        return f"/v1/thumbnail?doc_id={quote(doc_id, safe='')}"

    def get(self, doc_id: str) -> bytes | None:
        """JPEG bytes of the document's thumbnail, None when it has no readable image."""
        with self.lock:
            if doc_id in self.cache:
                self.cache.move_to_end(doc_id)
                return self.cache[doc_id]
        thumb = thumbnail(self._image(doc_id), self.size, format="JPEG")
        if thumb is None:
            return None
        with self.lock:
            self.cache[doc_id] = thumb
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return thumb

    def _image(self, doc_id: str) -> bytes | None:
        if doc_id in self.paths:
            return storage.read_bytes(self.paths[doc_id])
        if doc_id not in self.rows:
            return None
        number, row = self.rows[doc_id]
        images = self.groups[number].to_table(columns=["image"]).column("image")
        return images[row].as_py()


def _is_parquet(path: str) -> bool:
    return path.endswith(".parquet") or (
        storage.exists(path) and not os.path.splitext(path)[1] and _has_parquet_files(path)
    )


def _has_parquet_files(path: str) -> bool:
    try:
        return bool(storage.list_files(path, (".parquet",)))
    except (OSError, ValueError):
        return False
