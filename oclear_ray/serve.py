"""The library side of serving, importable and testable without Ray: the HTTP API and search
page (``build_api(service)``, a FastAPI app) and all it runs. ``serve/app.py`` wraps it in Ray
Serve deployments. In the order a request flows:

- errors and versions: ``QueryError`` (a refused query and its HTTP status), ``VersionMismatch``
  and ``check_versions`` (the model and the index made by one model version), ``Paths``;
- the HTTP app: ``build_api`` (``/``, ``/v1/search``, ``/v1/health``, ``/v1/info``,
  ``/v1/thumbnail``), every error JSON ``{"error": message, "status": code}``;
- reading a query: the body under a byte limit, multipart or JSON fields -> ``Query``; the image
  decoded under byte and pixel limits (``query_pixels``), ``k``, ``text``, ``category`` checked;
- the service: ``SearchService`` holds the loaded state (503 until ``loaded``), answers a query
  through the async function it is given and tells its ``metrics`` (``Uncounted`` here; Ray
  Serve metrics in ``serve.app``) each search answered and each refused;
- batching: ``QueryBatcher`` gathers concurrent queries; ``search_batch`` answers a batch with
  one encoder call and one call per shard (Serve deployment handles in ``serve.app``), merged;
- one shard: ``ShardSearcher``, a FAISS shard searched with its tuned parameters and an
  optional category filter;
- hits: ``hits_of`` joins the merged ids to the documents' metadata;
- thumbnails: ``Thumbnails`` of the documents, from their image paths or the embedded catalog.

Errors a client caused are ``QueryError`` with the HTTP status they map to (400 not an image or
truncated, 404 no such thumbnail, 413 over the byte or pixel limit, 415 not a form or JSON, 422
bad parameters, 503 the index not loaded yet); its ``reason`` names the status in the app's
metrics. No bad request takes the app down.
"""

# ruff: noqa: E741 -- FAISS naming: D, I are distances and ids
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import os
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from oclear_ray import storage
from oclear_ray.contract import Limits
from oclear_ray.embed import read_summary
from oclear_ray.evaluate import thumbnail
from oclear_ray.preprocess import PreprocessConfig, fit_image, to_rgb
from oclear_ray.search import (
    load_documents,
    load_shard,
    lookup,
    merge,
    read_manifest,
    search_parameters,
)

MAX_K = 100
MAX_TEXT = 1000
HIT_FIELDS = ("doc_id", "text", "category", "label", "score")
FORM_OVERHEAD = 1 << 16  # multipart boundaries and small fields next to the image


# ---- errors and versions ----------------------------------------------------------------------


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


# ---- the HTTP app -----------------------------------------------------------------------------


def error(status: int, message: str) -> JSONResponse:
    """The JSON body of every error: ``{"error": message, "status": code}``."""
    return JSONResponse({"error": message, "status": status}, status_code=status)


def build_api(service: SearchService) -> FastAPI:
    """The FastAPI app: ``/`` page, ``/v1/search``, ``/v1/health``, ``/v1/info``, thumbnails."""
    api = FastAPI(title="oclear-ray search", docs_url="/docs", redoc_url=None)
    page = search_page()

    @api.exception_handler(QueryError)
    async def _query_error(_, exc: QueryError):
        return error(exc.status, str(exc))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        return error(422, "; ".join(str(e.get("msg")) for e in exc.errors()) or "bad parameters")

    @api.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @api.exception_handler(Exception)
    async def _internal_error(_, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @api.get("/", response_class=HTMLResponse)
    async def index_page():
        return HTMLResponse(page)

    @api.get("/v1/health")
    async def health():
        ok = service.state == "ready"
        body = {"status": service.state, **({"error": service.error} if service.error else {})}
        return JSONResponse(body, status_code=200 if ok else 503)

    @api.get("/v1/info")
    async def info():
        limits = {"max_bytes": service.limits.max_bytes, "max_pixels": service.limits.max_pixels}
        return {**service.info, "state": service.state, "max_k": MAX_K, "limits": limits}

    @api.post("/v1/search")
    async def search(request: Request):
        try:
            service.require_ready()
            query = await parse_query(request, service)
        except QueryError as exc:
            service.metrics.refused(exc.reason)
            raise
        return JSONResponse(await service.search(query))

    @api.get("/v1/thumbnail")
    async def document_thumbnail(doc_id: str):
        service.require_ready()
        thumbs = service.thumbnails
        data = await asyncio.to_thread(thumbs.get, doc_id) if thumbs is not None else None
        if data is None:
            raise QueryError(404, f"no thumbnail for doc_id {doc_id!r}")
        headers = {"Cache-Control": "public, max-age=3600"}
        return Response(data, media_type="image/jpeg", headers=headers)

    return api


def search_page() -> str:
    """``serve/page.html``, package data of the ``serve`` package (``pyproject.toml``), found
    through its resources: in a checkout, an editable install and an installed wheel alike."""
    return resources.files("serve").joinpath("page.html").read_text()


# ---- reading a query --------------------------------------------------------------------------


@dataclass
class Query:
    """A checked query: the image as the encoder's pixels, the text, ``k``, the category."""

    pixels: np.ndarray | None
    text: str | None
    k: int
    category: str | None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading it when the
    client declared its length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise QueryError(413, f"request body over limit ({declared} > {limit} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise QueryError(413, f"request body over limit (> {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def replay(request: Request, body: bytes) -> Request:
    """A request over ``body`` already read (so that its form can be parsed)."""

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


async def parse_query(request: Request, service: SearchService) -> Query:
    """Multipart (``image`` file, ``text``, ``k``, ``category``) or JSON (``image`` base64)."""
    limits = service.limits
    body = await read_body(request, math.ceil(limits.max_bytes * 4 / 3) + FORM_OVERHEAD)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data" or kind == "application/x-www-form-urlencoded":
        fields = await _form_fields(replay(request, body))
    elif kind == "application/json":
        try:
            fields = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QueryError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise QueryError(422, "JSON body must be an object")
        image = fields.get("image")
        if image is not None and not isinstance(image, str):
            raise QueryError(422, "image must be a base64 string")
        fields["image"] = decode_base64(image, limits) if image else None
    else:
        raise QueryError(415, "send multipart/form-data or application/json")
    unknown = set(fields) - {"image", "text", "k", "category"}
    if unknown:
        raise QueryError(422, f"unknown fields: {', '.join(sorted(unknown))}")
    text = parse_text(fields.get("text"))
    k = parse_k(fields.get("k", 10))
    category = parse_category(fields.get("category"))
    if fields.get("image") is None and text is None:
        raise QueryError(422, "give an image, a text, or both")
    pixels = None
    if fields.get("image") is not None:
        data = fields["image"]
        if decodes_quickly(data):  # a thread hop would cost more than the decode
            pixels = query_pixels(data, limits, service.preprocess)
        else:
            pixels = await asyncio.to_thread(query_pixels, data, limits, service.preprocess)
    return Query(pixels, text, k, category)


async def _form_fields(request: Request) -> dict:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except HTTPException as exc:  # starlette's own form limits
        raise QueryError(exc.status_code, f"bad form: {exc.detail}") from exc
    except Exception as exc:  # python-multipart raises several types on malformed bodies
        raise QueryError(400, f"malformed form body: {exc}") from exc
    fields = {}
    for key, value in form.multi_items():
        if key in fields:
            raise QueryError(422, f"field {key!r} given twice")
        fields[key] = await value.read() if hasattr(value, "read") else value
    if isinstance(fields.get("image"), str):
        raise QueryError(422, "image must be a file upload")
    return fields


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


# ---- the service ------------------------------------------------------------------------------


class Uncounted:
    """The metrics of a service nobody collects from (in-process tests, tools)."""

    def answered(self, results: int) -> None:
        """A search answered with ``results`` hits."""

    def refused(self, reason: str) -> None:
        """A search refused (``QueryError.reason``)."""

    def serving(self, documents: int) -> None:
        """The index served holds ``documents`` (told at load and at every health check)."""


class SearchService:
    """What the routes need: limits, ``answer`` (a query -> its merged ``(D, I)``), and the
    loaded index state (documents, thumbnails, shard info). Searches answer 503 until
    ``loaded``."""

    def __init__(
        self,
        *,
        limits: Limits,
        preprocess: PreprocessConfig,
        answer: Answer,
        info,
        metrics: Uncounted | None = None,
    ):
        self.limits, self.preprocess, self.answer = limits, preprocess, answer
        self.info = dict(info)
        self.metrics = metrics or Uncounted()
        self.state, self.error = "loading", None
        self.documents = self.thumbnails = None

    def loaded(self, documents, thumbnails, shards: list[dict]) -> None:
        self.documents, self.thumbnails = documents, thumbnails
        self.info.update(shards=shards, documents=documents.num_rows)
        self.state = "ready"
        self.metrics.serving(documents.num_rows)

    def failed(self, exc: BaseException) -> None:
        self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"

    def require_ready(self) -> None:
        if self.state != "ready":
            detail = f": {self.error}" if self.error else ""
            raise QueryError(503, f"index is {self.state}{detail}")

    async def search(self, query: Query) -> dict:
        self.require_ready()
        start = time.perf_counter()
        D, I = await self.answer(query)
        hits = hits_of(self.documents, D, I, thumbnails=self.thumbnails)
        self.metrics.answered(len(hits))
        return {
            "model_version": self.info["model_version"],
            "index_version": self.info["index_version"],
            "k": query.k,
            "category": query.category,
            "results": hits,
            "took_ms": round(1000 * (time.perf_counter() - start), 2),
        }


# ---- batching ---------------------------------------------------------------------------------


Encode = Callable[[list[tuple[np.ndarray | None, str | None]]], Awaitable[np.ndarray]]
Search = Callable[[np.ndarray, int, str | None], Awaitable[list]]
Answer = Callable[[Query], Awaitable[tuple[np.ndarray, np.ndarray]]]


class QueryBatcher:
    """Gathers concurrent queries into calls of ``run`` (queries -> their answers, in order),
    at most ``slots`` calls at a time.

    A batch is formed only once a slot is free: a query waits up to ``wait_s`` from its arrival
    for others (up to ``max_size``), and the queries that queue while every slot is busy go out
    together when one frees. Under load the batches grow with the queue, so the cost per query
    falls as the load rises. Hand-written because Serve's ``@serve.batch`` forms a batch when its
    wait ends and only then waits for a free slot: under an open-loop load its batches keep the
    size the wait gives and queue up as many small ones. Measured (``bench/serve.py``,
    bench/README.md) at 130 queries/s with a 5 ms wait: p99 3,702 ms with ``@serve.batch`` in
    the ingress, 77 ms with this batcher (mean batch 1.6 -> 2.4).
    """

    def __init__(
        self,
        run: Callable[[list], Awaitable[list]],
        *,
        max_size: int,
        wait_s: float,
        slots: int = 2,
    ):
        if max_size < 1 or slots < 1 or wait_s < 0:
            raise ValueError(
                f"bad batcher settings: max_size {max_size}, slots {slots}, wait_s {wait_s}"
            )
        self.run, self.max_size, self.wait_s, self.slots = run, max_size, wait_s, slots
        self.pending: deque[tuple[object, asyncio.Future, float]] = deque()
        self.batches = self.queries = 0  # answered so far (the bench reads mean batch sizes)
        self._arrived: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()  # the loop keeps only weak references

    async def __call__(self, query):
        loop = asyncio.get_running_loop()
        if self._loop_task is None:
            self._arrived = asyncio.Event()
            self._loop_task = loop.create_task(self._form_batches())
        future = loop.create_future()
        self.pending.append((query, future, loop.time()))
        self._arrived.set()
        return await future

    async def _form_batches(self) -> None:
        loop, free = asyncio.get_running_loop(), asyncio.Semaphore(self.slots)
        while True:
            await free.acquire()
            while not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self.pending[0][2] + self.wait_s
            while len(self.pending) < self.max_size and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = [self.pending.popleft() for _ in range(min(self.max_size, len(self.pending)))]
            task = loop.create_task(self._answer(batch))
            self._running.add(task)
            task.add_done_callback(lambda t: (self._running.discard(t), free.release()))

    async def _answer(self, batch: list) -> None:
        live = [(query, future) for query, future, _ in batch if not future.done()]
        if not live:
            return
        self.batches, self.queries = self.batches + 1, self.queries + len(live)
        try:
            answers = await self.run([query for query, _ in live])
            if len(answers) != len(live):
                raise RuntimeError(f"{len(answers)} answers for a batch of {len(live)} queries")
        except Exception as exc:  # every query of the batch gets the error
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), answer in zip(live, answers, strict=True):
            if not future.done():
                future.set_result(answer)


async def search_batch(queries: list[Query], encode: Encode, search: Search) -> list:
    """``(D, I)`` of each query: one encoder call for the batch, then per category filter one
    call per shard (``search`` fans out) with the largest ``k`` asked, merged, cut to each ``k``.
    """
    vectors = await encode([(q.pixels, q.text) for q in queries])
    groups: dict[str | None, list[int]] = {}
    for i, query in enumerate(queries):
        groups.setdefault(query.category, []).append(i)

    async def group(category: str | None, rows: list[int]):
        k = max(queries[i].k for i in rows)
        D, I = merge(await search(vectors[rows], k, category), k)
        return rows, D, I

    out: list = [None] * len(queries)
    for rows, D, I in await asyncio.gather(*(group(c, r) for c, r in groups.items())):
        for j, i in enumerate(rows):
            out[i] = (D[j, : queries[i].k], I[j, : queries[i].k])
    return out


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


# ---- hits -------------------------------------------------------------------------------------


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
