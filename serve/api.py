"""The HTTP API and search page of the serving app, independent of Ray: ``build_api(service)``
returns a FastAPI app; ``SearchService`` holds the loaded state and answers a query through the
async function it is given; ``search_batch`` answers a batch of queries with one encoder call and
one call per shard (through Serve deployment handles in ``serve.app``); ``QueryBatcher`` gathers
concurrent queries into those batches. The service tells its ``metrics`` (``serve.app`` gives
it Ray Serve metrics) each search answered and each search refused.

Every error is JSON ``{"error": message, "status": code}``; no bad request takes the app down.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from oclear_ray.contract import Limits
from oclear_ray.preprocess import PreprocessConfig
from oclear_ray.search import merge
from oclear_ray.serve import (
    MAX_K,
    QueryError,
    decode_base64,
    decodes_quickly,
    hits_of,
    parse_category,
    parse_k,
    parse_text,
    query_pixels,
)

PAGE = Path(__file__).with_name("page.html")
FORM_OVERHEAD = 1 << 16  # multipart boundaries and small fields next to the image


@dataclass
class Query:
    pixels: np.ndarray | None
    text: str | None
    k: int
    category: str | None


Encode = Callable[[list[tuple[np.ndarray | None, str | None]]], Awaitable[np.ndarray]]
Search = Callable[[np.ndarray, int, str | None], Awaitable[list]]
Answer = Callable[[Query], Awaitable[tuple[np.ndarray, np.ndarray]]]


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


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def build_api(service: SearchService) -> FastAPI:
    """The FastAPI app: ``/`` page, ``/v1/search``, ``/v1/health``, ``/v1/info``, thumbnails."""
    api = FastAPI(title="oclear-ray search", docs_url="/docs", redoc_url=None)
    page = PAGE.read_text()

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
    async def thumbnail(doc_id: str):
        service.require_ready()
        thumbs = service.thumbnails
        data = await asyncio.to_thread(thumbs.get, doc_id) if thumbs is not None else None
        if data is None:
            raise QueryError(404, f"no thumbnail for doc_id {doc_id!r}")
        headers = {"Cache-Control": "public, max-age=3600"}
        return Response(data, media_type="image/jpeg", headers=headers)

    return api
