"""The Ray Serve application: a FastAPI ingress, a query encoder with dynamic batching and
autoscaling, and one deployment per FAISS shard.

    ingress (/, /v1/search, /v1/health, /v1/info)
      -> QueryEncoder.encode   (@serve.batch; autoscaling replicas)
      -> IndexShard{i}.search  (one deployment per shard of the manifest, queried concurrently)
      -> merge top-k, join document metadata

The HTTP API, the query checks, the batcher and the shard searcher deployed here are the
library's ``oclear_ray.serve`` (no Ray there).

``build_app(args)`` is the Serve app builder (``serve run serve.app:build_app workdir=W``,
``serve deploy serve/config.yaml``, ``oclear serve --workdir W``). It refuses a model and an
index of different model versions; each deployment checks again when it loads.

The app's own metrics (``ray.serve.metrics``, exported by Ray's metrics agent to Prometheus as
``ray_oclear_*``, with Serve's deployment, replica and application tags): encoder batch size
and latency, shard fan-out search latency, hits per search, refused searches by reason, and the
documents served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields

import numpy as np
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve import metrics

from oclear_ray.config import _build, _read
from oclear_ray.contract import Limits
from oclear_ray.evaluate import QueryEmbedder
from oclear_ray.export import doc_view_of
from oclear_ray.preprocess import PreprocessConfig
from oclear_ray.search import bounded, check_bounds
from oclear_ray.serve import (
    Paths,
    Query,
    QueryBatcher,
    SearchService,
    ShardSearcher,
    Thumbnails,
    Uncounted,
    build_api,
    check_versions,
    embedded_catalog,
    search_batch,
)

log = logging.getLogger("ray.serve")

# Serve's fast path, set in the environment of the Ray cluster before it starts: HAProxy as the
# HTTP ingress in front of the ingress replicas (no Python proxy hop) and Serve's
# throughput-optimized settings (gRPC between replicas, user code on the replica's loop).
FAST_SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
DEAD_REPLICA = (ActorDiedError, ActorUnavailableError, RayActorError)


#: histogram buckets: milliseconds, and queries per encoder batch
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def _latency(name: str, description: str) -> metrics.Histogram:
    return metrics.Histogram(name, description=description, boundaries=LATENCY_MS)


class IngressMetrics(Uncounted):
    """The ingress's metrics: hits per search (its count: searches answered), searches refused
    by reason, documents served."""

    def __init__(self):
        self.results = metrics.Histogram(
            "oclear_search_results",
            description="Hits returned per search.",
            boundaries=[1, 5, 10, 20, 50, 100],
        )
        self.refusals = metrics.Counter(
            "oclear_rejected_uploads",
            description="Searches refused (bad upload, bad parameters, not ready), by reason.",
            tag_keys=("reason",),
        )
        self.documents = metrics.Gauge(
            "oclear_index_documents", description="Documents in the served index."
        )

    def answered(self, results: int) -> None:
        self.results.observe(results)

    def refused(self, reason: str) -> None:
        self.refusals.inc(tags={"reason": reason})

    def serving(self, documents: int) -> None:
        self.documents.set(documents)


def count_items(calls: list[list]) -> int:
    """Batch size of the encoder: queries, not calls (an ingress sends its batch in one call)."""
    return sum(len(c) for c in calls)


@dataclass(kw_only=True)
class AppArgs:
    """Arguments of ``build_app`` (the ``args:`` of ``serve/config.yaml``).

    ``num_gpus`` (default 0) is the GPUs per query encoder replica (a fraction shares one):
    above 0 the encoder runs on CUDA in half precision (``export.inference_autocast``), at 0 on the
    CPU with ``torch_threads`` threads. ``*_cpus`` are the CPUs per replica of each deployment.
    """

    workdir: str = "work"
    model_dir: str | None = None
    max_batch_size: int = bounded(16, ">= 1")
    # a batch costs Serve ~20 ms of CPU in calls whatever its size (2 cores, bench/serve.py):
    # waiting 30 ms for companions gives lower tail latency from ~100 QPS up than 5 ms does
    batch_wait_timeout_s: float = bounded(0.03, ">= 0")
    concurrent_batches: int = bounded(2, ">= 1")
    encoder_wait_timeout_s: float = bounded(0.0, ">= 0")
    torch_threads: int = bounded(1, ">= 1")
    shard_replicas: int = bounded(1, ">= 1")
    ingress_replicas: int = bounded(1, ">= 1")
    encoder_cpus: float = bounded(0.25, "> 0")
    num_gpus: float = 0.0
    shard_cpus: float = bounded(0.1, "> 0")
    ingress_cpus: float = bounded(0.25, "> 0")
    max_bytes: int = bounded(10_000_000, ">= 1")
    max_pixels: int = 40_000_000

    def __post_init__(self):
        check_bounds(self)
        gpus = self.num_gpus
        if isinstance(gpus, bool) or not isinstance(gpus, int | float) or not gpus >= 0:
            raise ValueError(f"num_gpus must be a number >= 0, got {gpus!r}")
        Limits(max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    @classmethod
    def from_dict(cls, args: dict) -> AppArgs:
        """From YAML / CLI values, read by the project's one config parser (``config._read``):
        a string such as ``"8"`` becomes the field's type; a value of another type is an error
        naming the field."""
        unknown = set(args) - {f.name for f in fields(cls)}
        if unknown:  # here, not the parser's message: that one speaks of a config file
            raise ValueError(f"unknown app args: {', '.join(sorted(unknown))}")
        return _build(cls, _read(cls, args, ""))

    @property
    def paths(self) -> Paths:
        return Paths.of(self.workdir, self.model_dir)

    @property
    def encoder_device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def encoder_resources(self) -> dict:
        """``ray_actor_options`` of the query encoder replicas."""
        gpus = {"num_gpus": self.num_gpus} if self.num_gpus > 0 else {}
        return {"num_cpus": self.encoder_cpus, **gpus}


@serve.deployment(
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 2,
        # its calls are ingress batches, at most concurrent_batches (2) per ingress replica:
        # another encoder replica once more than one ingress replica's worth are in flight
        "target_ongoing_requests": 2,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    },
    max_ongoing_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=30,
    ray_actor_options={"num_cpus": 0.25},
)
class QueryEncoder:
    """The exported query encoder on ``device`` (half precision on CUDA, see
    ``export.inference_autocast``), run by evaluation's ``QueryEmbedder``; concurrent calls are
    batched into one model call."""

    def __init__(
        self,
        model_dir: str,
        model_version: str,
        *,
        batch: dict,
        threads: int = 1,
        device: str = "cpu",
    ):
        self.embedder = QueryEmbedder(model_dir, threads=threads, device=device)
        found = self.embedder.encoder.model_version
        if found != model_version:
            raise RuntimeError(
                f"model at {model_dir} is now version {found}, the app was built for "
                f"{model_version}: redeploy"
            )
        self.encode.set_max_batch_size(batch["max_batch_size"])
        self.encode.set_batch_wait_timeout_s(batch["batch_wait_timeout_s"])
        self.batches: list[int] = []
        self.batch_size = metrics.Histogram(
            "oclear_encode_batch_size",
            description="Queries per query-encoder batch.",
            boundaries=BATCH_SIZES,
        )
        self.latency = _latency("oclear_encode_latency_ms", "Query-encoder time per batch.")
        # one call before taking traffic: the first forward pass is several times slower
        size = self.embedder.encoder.preprocess.image_size
        self.embedder.encode([np.full((size, size, 3), 255, np.uint8)], ["warm up"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, batch_size_fn=count_items)
    async def encode(self, calls: list[list[tuple]]) -> list[np.ndarray]:
        """Each call is a list of ``(pixels or None, text or None)``; returns [n, D] per call."""
        items = [item for call in calls for item in call]
        self.batches = (self.batches + [len(items)])[-1000:]
        start = time.perf_counter()
        vectors = self.embedder.encode([p for p, _ in items], [t for _, t in items])
        self.latency.observe(1000 * (time.perf_counter() - start))
        self.batch_size.observe(len(items))
        return np.split(vectors, np.cumsum([len(c) for c in calls])[:-1])

    def batch_sizes(self) -> list[int]:
        """Sizes of the last batches run (for the bench and tests)."""
        return list(self.batches)

    def check_health(self) -> None:
        if self.embedder.encoder is None:
            raise RuntimeError("query encoder not loaded")


@serve.deployment(
    max_ongoing_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=30,
    ray_actor_options={"num_cpus": 0.1},
)
class IndexShard:
    """One FAISS shard of the manifest (memory-mapped, checksum verified)."""

    def __init__(self, index_dir: str, shard: int, model_version: str):
        import faiss

        faiss.omp_set_num_threads(1)
        self.searcher = ShardSearcher(index_dir, shard, model_version)

    def info(self) -> dict:
        return self.searcher.info

    async def search(self, xq: np.ndarray, k: int, category: str | None = None):
        # on the replica's loop: a shard search is short, a thread hop per call costs more
        return self.searcher.search(xq, k, category)

    def check_health(self) -> None:
        expected = self.searcher.entry["vectors"]
        if self.searcher.index.ntotal != expected:
            raise RuntimeError(f"shard holds {self.searcher.index.ntotal} vectors, not {expected}")


async def call(method, *args):
    """Await a deployment method, once more when the replica died under the request."""
    try:
        return await method.remote(*args)
    except DEAD_REPLICA as exc:
        log.warning("retrying on another replica after %s", type(exc).__name__)
        return await method.remote(*args)


@serve.deployment(
    max_ongoing_requests=256,  # Serve's default (5) would cap the batches the ingress can form
    health_check_period_s=10,
    health_check_timeout_s=30,
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress()
class SearchIngress:
    """Decodes uploads, encodes, fans out to the shards, merges; serves the page and the API.

    Concurrent queries are batched here too (``QueryBatcher``), so that a batch costs one
    encoder call and one call per shard. The documents table and the shards' info load in the
    background: searches answer 503 until then.
    """

    def __init__(self, encoder, shards: list, args: dict, model: dict, index: dict):
        self.args = AppArgs.from_dict(args)
        self.encoder, self.shards = encoder, shards
        info = {
            "model_version": model["model_version"],
            "doc_view": doc_view_of(model),
            "view_choice": model.get("view_choice"),
            "index_version": index["version"],
            "factory": index["factory"],
            "dim": index["dim"],
            "count": index["count"],
        }
        self.batcher = QueryBatcher(
            self.answer,
            max_size=self.args.max_batch_size,
            wait_s=self.args.batch_wait_timeout_s,
            slots=self.args.concurrent_batches,
        )
        self.service = SearchService(
            limits=Limits(max_bytes=self.args.max_bytes, max_pixels=self.args.max_pixels),
            preprocess=PreprocessConfig(**model["model"]["preprocess"]),
            answer=self.batcher if self.args.max_batch_size > 1 else self.answer_one,
            info=info,
            metrics=IngressMetrics(),
        )
        self.search_latency = _latency(
            "oclear_search_latency_ms", "Search of every shard and merge, per ingress batch."
        )
        # the constructor runs on the replica's event loop: load there, the file reads in threads
        self.loader = asyncio.get_running_loop().create_task(self._load())

    async def answer(self, queries: list[Query]) -> list:
        return await search_batch(queries, self.encode, self.search)

    def batch_counts(self) -> tuple[int, int]:
        """``(batches, queries)`` the ingress has answered in batches (for the bench)."""
        return self.batcher.batches, self.batcher.queries

    async def answer_one(self, query: Query):
        """Unbatched (``max_batch_size`` 1): each query on its own, as many at once as come."""
        return (await search_batch([query], self.encode, self.search))[0]

    async def encode(self, items: list) -> np.ndarray:
        return await call(self.encoder.encode, items)

    async def search(self, xq: np.ndarray, k: int, category: str | None):
        start = time.perf_counter()
        found = await asyncio.gather(*(call(s.search, xq, k, category) for s in self.shards))
        self.search_latency.observe(1000 * (time.perf_counter() - start))
        return found

    async def _load(self) -> None:
        from oclear_ray.search import load_documents, read_manifest

        try:
            paths = self.args.paths
            expected = self.service.info["model_version"]
            manifest = await asyncio.to_thread(read_manifest, paths.index_dir, expected)
            documents = await asyncio.to_thread(load_documents, paths.index_dir, manifest)
            infos = await asyncio.gather(*(s.info.remote() for s in self.shards))
            for shard in infos:
                if shard["index_version"] != manifest["version"]:
                    raise RuntimeError(
                        f"shard {shard['shard']} serves index version {shard['index_version']}, "
                        f"the ingress {manifest['version']}: redeploy"
                    )
            catalog = await asyncio.to_thread(embedded_catalog, paths.workdir)
            thumbs = await asyncio.to_thread(Thumbnails, documents, catalog)
            self.service.loaded(documents, thumbs, list(infos))
        except Exception as exc:  # reported by /v1/health and check_health
            log.exception("loading the index failed")
            self.service.failed(exc)

    def __serve_build_asgi_app__(self):
        return build_api(self.service)

    def check_health(self) -> None:
        if self.service.state == "failed":
            raise RuntimeError(self.service.error)
        if self.service.state == "ready":  # Ray drops a gauge unset for two export intervals
            self.service.metrics.serving(self.service.info["documents"])


def build_app(args: dict):
    """The application graph for ``args`` (see ``AppArgs``); refuses mismatched versions."""
    app_args = AppArgs.from_dict(dict(args))
    paths = app_args.paths
    # replicas do not run in this directory: hand them absolute paths
    app_args.workdir, app_args.model_dir = paths.workdir, paths.model_dir
    model, index = check_versions(paths)
    version = model["model_version"]
    batch = {
        "max_batch_size": app_args.max_batch_size,
        "batch_wait_timeout_s": app_args.encoder_wait_timeout_s,
    }
    encoder = QueryEncoder.options(ray_actor_options=app_args.encoder_resources).bind(
        paths.model_dir,
        version,
        batch=batch,
        threads=app_args.torch_threads,
        device=app_args.encoder_device,
    )
    shards = [
        IndexShard.options(
            name=f"IndexShard{i}",
            num_replicas=app_args.shard_replicas,
            ray_actor_options={"num_cpus": app_args.shard_cpus},
        ).bind(paths.index_dir, i, version)
        for i in range(len(index["shards"]))
    ]
    ingress = SearchIngress.options(
        num_replicas=app_args.ingress_replicas,
        ray_actor_options={"num_cpus": app_args.ingress_cpus},
    )
    return ingress.bind(encoder, shards, vars(app_args), _small(model), _small(index))


def _small(manifest: dict) -> dict:
    """The manifest fields the ingress needs (not per-shard deletions or list owners)."""
    keep = ("model_version", "version", "factory", "dim", "count", "model")
    return {k: manifest[k] for k in keep if k in manifest}
