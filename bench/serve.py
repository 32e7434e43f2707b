"""Load test of the search app on 127.0.0.1: batched vs unbatched, vs in-process.

    python bench/serve.py [--workdir W] [--data CATALOG] [--docs 2000] [--duration 6]
                          [--concurrency 1 2 4 8 16 32] [--batch-size 16] [--proxy haproxy]

Without ``--workdir`` a small work dir is built first (the first ``--docs`` documents of
``--data``, an untrained model of the default architecture exported as training exports it,
embedded in process, 2 FAISS shards); a ``--workdir`` without an index is built the same way
and kept. Queries are ``eval_queries.parquet`` photos next to the catalog when present, else
catalog images, sent as multipart uploads with ``k=10``.

The load comes from one client process of its own (a keep-alive HTTP/1.1 client on asyncio
sending pre-built requests), the same for every run; its CPU time and the machine's are
reported, since client and server share the cores. Serve runs with HAProxy in front of the
ingress replicas and its throughput-optimized settings (``--proxy python``: the Python proxy).
For the app deployed with ``max_batch_size`` 1 (unbatched: one query per ingress call, encoder
call and shard call) and ``--batch-size`` (batched), a closed-loop sweep (``c`` connections,
each sending the next request when the last returns) for ``--duration`` seconds per
concurrency gives QPS and p50/p99 latency; then, for the batched app, open-loop runs at half
its peak QPS (fixed-rate arrivals, then Poisson ones; latency from the scheduled send time;
a first second, not counted, warms the connections up) give the p99 under load. The same
decode + encode + search + lookup called in this process (one query at a time, and batches of
``--batch-size``) is the baseline. Goals: batched >= 3x unbatched peak QPS; p99 at half
saturation (fixed rate) <= 1.5x the batched app's single-request (c=1) p50; no errors. The
load average is printed: other jobs on the machine skew the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GOALS = {"batched/unbatched QPS": 3.0, "p99 at half saturation / single p50": 1.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="work dir (train/model + index); built there when missing")
    p.add_argument("--data", default="/work/shared/data/openmoji-dev/catalog.parquet")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per load point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument(
        "--proxy",
        choices=["haproxy", "python"],
        default="haproxy",
        help="Serve's HTTP ingress: HAProxy in front of the ingress replicas, with Serve's "
        "throughput-optimized settings (serve.app.FAST_SERVE_ENV), or the Python proxy actor",
    )
    p.add_argument(
        "--arrivals",
        nargs="+",
        choices=["uniform", "poisson"],
        default=["uniform", "poisson"],
        help="open-loop arrival processes at half saturation; the goal is judged on the first",
    )
    p.add_argument("--batch-wait", type=float, help="the app's batch_wait_timeout_s")
    p.add_argument("--concurrent-batches", type=int, help="the app's concurrent_batches")
    p.add_argument(
        "--modes", nargs="+", choices=["unbatched", "batched"], default=["unbatched", "batched"]
    )
    return p.parse_args(argv)


# ---- the work dir and the queries ---------------------------------------------------------------


def build_workdir(out: str, data: str, docs: int) -> str:
    """A work dir over the first ``docs`` documents with an untrained default model."""
    import torch

    from oclear_ray.config import ModelConfig, TextEncoderConfig
    from oclear_ray.embed import DocEmbedder, part_path, write_part, write_summary
    from oclear_ray.export import export_model
    from oclear_ray.index import IndexConfig, local_map, sync_index
    from oclear_ray.model import RetrievalModel
    from oclear_ray.text import train_tokenizer

    os.makedirs(out, exist_ok=True)
    table = pq.read_table(data).slice(0, docs)
    catalog = os.path.join(out, "catalog.parquet")
    pq.write_table(table, catalog)
    tokenizer = train_tokenizer(table.column("text").to_pylist(), vocab_size=4000)
    torch.manual_seed(0)
    config = ModelConfig(text=TextEncoderConfig(vocab_size=tokenizer.vocab_size))
    model_dir = os.path.join(out, "train", "model")
    version = export_model(RetrievalModel(config).eval(), tokenizer, model_dir)
    torch.set_num_threads(2)
    embedder, embed_dir = DocEmbedder(model_dir, threads=2), os.path.join(out, "embed")
    for i, batch in enumerate(table.to_batches(max_chunksize=256)):
        write_part(part_path(embed_dir, i), embedder(pa.Table.from_batches([batch])), version)
    write_summary(embed_dir, version, config.embed_dim, {"catalog": catalog})
    sync_index(out, IndexConfig(shards=2), map_fn=local_map)
    return out


def query_images(data: str, n: int = 64) -> list[bytes]:
    queries = os.path.join(os.path.dirname(data), "eval_queries.parquet")
    source = queries if os.path.exists(queries) else data
    return pq.read_table(source, columns=["image"]).column("image").to_pylist()[:n]


def search_request(host: str, image: bytes, k: int) -> bytes:
    """The bytes of a ``POST /v1/search`` multipart upload, as a browser or httpx sends it."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"'
        f"\r\nContent-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    body = b"".join(parts)
    head = (
        f"POST /v1/search HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    )
    return head.encode() + body


def percentiles(latencies: list[float]) -> tuple[float, float]:
    if not latencies:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


# ---- the load client (its own process) ---------------------------------------------------------


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: writes a pre-built request, awaits the status."""

    def __init__(self):
        self.transport, self.buffer, self.waiter = None, bytearray(), None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            try:
                status = take_response(self.buffer)
            except ValueError as exc:
                self.waiter.set_exception(exc)
                return
            if status is not None:
                self.waiter.set_result(status)

    def connection_lost(self, exc):
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def send(self, request: bytes, timeout: float = 60.0) -> int:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None

    def close(self):
        if self.transport is not None:
            self.transport.close()


def take_response(buffer: bytearray) -> int | None:
    """Status of the complete response at the head of ``buffer`` (then removed), or None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    start = end + 4
    if "content-length" in headers:
        stop = start + int(headers["content-length"])
        if len(buffer) < stop:
            return None
    elif "chunked" in headers.get("transfer-encoding", ""):
        stop = _chunked_end(buffer, start)
        if stop is None:
            return None
    else:
        raise ValueError(f"response without a length: {lines[0]}")
    del buffer[:stop]
    return int(lines[0].split()[1])


def _chunked_end(buffer: bytearray, pos: int) -> int | None:
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2 + size + 2
        if len(buffer) < pos:
            return None
        if size == 0:
            return pos


class Load:
    """Closed- and open-loop load over pre-built requests; latencies in seconds."""

    def __init__(self, host: str, port: int, requests: list[bytes]):
        self.host, self.port, self.requests = host, port, requests
        self.latencies: list[float] = []
        self.errors = 0

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Connection, self.host, self.port)
        return conn

    async def one(
        self, conn: Connection | None, i: int, start: float, record: bool = True
    ) -> Connection | None:
        """Send request ``i``; a failed request is counted and its connection replaced."""
        try:
            conn = conn or await self.connect()
            ok = await conn.send(self.requests[i % len(self.requests)]) == 200
        except (OSError, ValueError, asyncio.TimeoutError):
            ok = False
        if ok:
            if record:
                self.latencies.append(time.perf_counter() - start)
            return conn
        self.errors += 1
        if conn is not None:
            conn.close()
        return None

    async def closed(self, concurrency: int, duration: float) -> None:
        conns = [await self.connect() for _ in range(concurrency)]
        deadline = time.perf_counter() + duration

        async def worker(seed: int):
            conn, i = conns[seed], seed
            while time.perf_counter() < deadline:
                conn = await self.one(conn, i, time.perf_counter())
                i += concurrency
            if conn is not None:
                conn.close()

        await asyncio.gather(*(worker(s) for s in range(concurrency)))

    async def open(
        self, rate: float, duration: float, arrivals: str, warmup: float = 1.0, seed: int = 0
    ) -> None:
        """``rate`` requests/s for ``warmup`` + ``duration`` s; latency counts from the scheduled
        time. The first ``warmup`` seconds are not recorded: they warm the connections up."""
        n = int(rate * (warmup + duration))
        gaps = (
            np.random.default_rng(seed).exponential(1 / rate, n)
            if arrivals == "poisson"
            else np.full(n, 1 / rate)
        )
        idle = [await self.connect() for _ in range(min(n, 64))]
        tasks, t0 = [], time.perf_counter()

        async def request(i: int, scheduled: float, record: bool):
            conn = await self.one(idle.pop() if idle else None, i, scheduled, record)
            if conn is not None:
                idle.append(conn)

        for i, at in enumerate(np.cumsum(gaps) - gaps[0]):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(request(i, t0 + at, at >= warmup)))
        await asyncio.gather(*tasks)
        for conn in idle:
            conn.close()


def client_main(pipe, host: str, port: int, requests: list[bytes]) -> None:
    """The client process: runs each load spec received on ``pipe``, answers its results."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    while (spec := pipe.recv()) is not None:
        load = Load(host, port, requests)
        cpu, wall = time.process_time(), time.perf_counter()
        if spec["kind"] == "closed":
            asyncio.run(load.closed(spec["concurrency"], spec["duration"]))
        else:
            asyncio.run(load.open(spec["rate"], spec["duration"], spec["arrivals"]))
        pipe.send(
            {
                "latencies": load.latencies,
                "errors": load.errors,
                "client_cpu_s": time.process_time() - cpu,
                "wall_s": time.perf_counter() - wall,
            }
        )


class LoadClient:
    """The load client process, started once and driven over a pipe."""

    def __init__(self, host: str, port: int, requests: list[bytes]):
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process = context.Process(
            target=client_main, args=(child, host, port, requests), daemon=True
        )
        self.process.start()

    def run(self, **spec) -> dict:
        busy = machine_busy()
        self.pipe.send(spec)
        result = self.pipe.recv()
        result["machine_busy"] = machine_busy(busy)
        return result

    def close(self) -> None:
        self.pipe.send(None)
        self.process.join(10)


def machine_busy(since: tuple[int, int] | None = None):
    """``(busy, total)`` jiffies of all CPUs; with ``since``: the busy share since then."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    total, idle = sum(values[:8]), values[3] + values[4]
    if since is None:
        return total - idle, total
    return (total - idle - since[0]) / max(1, total - since[1])


# ---- the runs ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(workdir: str, app_args: dict, url: str) -> None:
    import httpx
    from ray import serve

    from serve.app import build_app

    serve.run(
        build_app({"workdir": workdir, **app_args}),
        name="oclear",
        route_prefix="/",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/v1/health", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass  # HAProxy may not route to the new replica yet
        if time.time() > deadline:
            raise RuntimeError("app not ready after 120 s")
        time.sleep(0.3)


def summary(result: dict, duration: float) -> dict:
    p50, p99 = percentiles(result["latencies"])
    n = len(result["latencies"])
    return {
        "qps": n / duration,
        "p50": p50,
        "p99": p99,
        "errors": result["errors"],
        "client_cpu": result["client_cpu_s"] / (result["wall_s"] * (os.cpu_count() or 1)),
        "client_us": 1e6 * result["client_cpu_s"] / max(1, n + result["errors"]),
        "busy": result["machine_busy"],
    }


def show(label: str, row: dict) -> None:
    print(
        f"  {label}  QPS {row['qps']:7.1f}  p50 {row['p50']:7.1f} ms  p99 {row['p99']:7.1f} ms  "
        f"errors {row['errors']}  machine busy {100 * row['busy']:3.0f} %  client "
        f"{100 * row['client_cpu']:4.1f} % ({row['client_us']:.0f} us/request)",
        flush=True,
    )


def sweep(client: LoadClient, args) -> list[dict]:
    rows = []
    client.run(kind="closed", concurrency=4, duration=2.0)  # warm up
    for c in args.concurrency:
        result = client.run(kind="closed", concurrency=c, duration=args.duration)
        row = {"c": c, **summary(result, args.duration)}
        show(f"c={c:3d}", row)
        rows.append(row)
    return rows


def in_process(workdir: str, images: list[bytes], args) -> dict:
    """The same decode + encode + search + lookup in this process: single and batched QPS."""
    import torch

    from oclear_ray.contract import Limits
    from oclear_ray.evaluate import encode_queries
    from oclear_ray.export import load_query_encoder
    from oclear_ray.search import SearchIndex
    from oclear_ray.serve import query_pixels

    torch.set_num_threads(1)
    encoder = load_query_encoder(os.path.join(workdir, "train", "model"))
    index = SearchIndex.load(os.path.join(workdir, "index"), encoder.model_version)
    pre, limits = encoder.preprocess, Limits()

    def run(batch: int) -> tuple[float, float]:
        done, lat, deadline = 0, [], time.perf_counter() + args.duration
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            chunk = [images[(done + j) % len(images)] for j in range(batch)]
            pixels = [query_pixels(b, limits, pre) for b in chunk]
            index.search_documents(encode_queries(encoder, pixels, [None] * batch), args.k)
            lat.append(time.perf_counter() - start)
            done += batch
        return done / args.duration, percentiles(lat)[0]

    run(1)  # warm up
    single_qps, single_p50 = run(1)
    batched_qps, _ = run(args.batch_size)
    return {"single_qps": single_qps, "single_p50": single_p50, "batched_qps": batched_qps}


def start_ray(proxy: str) -> None:
    """An embedded Ray; for ``haproxy`` with Serve's fast-path settings in its environment."""
    from oclear_ray.runtime import init_ray
    from serve.app import FAST_SERVE_ENV

    os.environ.pop("RAY_ADDRESS", None)
    if proxy == "haproxy":
        os.environ.update(FAST_SERVE_ENV)
    else:
        for name in FAST_SERVE_ENV:
            os.environ.pop(name, None)
    init_ray(num_cpus=4)


def main(args) -> None:
    # `python bench/serve.py` puts bench/ first on sys.path, where this file would shadow the
    # `serve` package: put the repository root there instead (for this process and Ray's).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(here)] + [
        p for p in sys.path if os.path.abspath(p or ".") != here
    ]
    from ray import serve

    print(f"load average before: {os.getloadavg()}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-serve-")
    if not os.path.exists(os.path.join(workdir, "index")):
        build_workdir(workdir, args.data, args.docs)
    images = query_images(args.data)
    local = in_process(workdir, images, args)
    print(
        f"in process: single QPS {local['single_qps']:.1f} (p50 {local['single_p50']:.1f} ms), "
        f"batch {args.batch_size} QPS {local['batched_qps']:.1f}",
        flush=True,
    )
    start_ray(args.proxy)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    requests = [search_request(f"127.0.0.1:{port}", image, args.k) for image in images]
    client = LoadClient("127.0.0.1", port, requests)
    try:
        results = run_modes(client, workdir, url, args)
    finally:
        client.close()
        serve.shutdown()  # also stops HAProxy
    if set(args.modes) == {"unbatched", "batched"}:
        report(results, local, args.arrivals)
    print(f"load average after: {os.getloadavg()}")


def run_modes(client: LoadClient, workdir: str, url: str, args) -> dict:
    """Deploy each mode in turn; its sweep (and for batched, the open-loop runs)."""
    from ray import serve

    results = {}
    sizes = {"unbatched": 1, "batched": args.batch_size}
    app = {"ingress_replicas": args.ingress_replicas}
    if args.batch_wait is not None:
        app["batch_wait_timeout_s"] = args.batch_wait
    if args.concurrent_batches is not None:
        app["concurrent_batches"] = args.concurrent_batches
    for name in args.modes:
        deploy(workdir, {**app, "max_batch_size": sizes[name]}, url)
        print(f"{name} (max_batch_size {sizes[name]}, proxy {args.proxy}):", flush=True)
        if name == "unbatched":
            results[name] = sweep(client, args)
        else:
            ingress = serve.get_deployment_handle("SearchIngress", app_name="oclear")
            before = ingress.batch_counts.remote().result()
            results[name] = sweep(client, args)
            print(f"  ingress batches: {mean_batch(ingress, before)}")
            rate = max(r["qps"] for r in results[name]) / 2
            spec = {"kind": "open", "rate": rate, "duration": args.duration}
            for arrivals in args.arrivals:
                before = ingress.batch_counts.remote().result()
                half = summary(client.run(**spec, arrivals=arrivals), args.duration)
                results.setdefault("half", {})[arrivals] = {"rate": rate, **half}
                show(f"open loop, {arrivals} arrivals at {rate:.1f}/s", half)
                print(f"  ingress batches (warm-up included): {mean_batch(ingress, before)}")
        serve.delete("oclear")
    return results


def mean_batch(ingress, before: tuple[int, int]) -> str:
    """The ingress's mean batch size since ``before`` (its ``batch_counts`` then)."""
    (batches, queries), (b0, q0) = ingress.batch_counts.remote().result(), before
    batches, queries = batches - b0, queries - q0
    return f"{batches} of {queries / max(1, batches):.1f} queries on average"


def report(results: dict, local: dict, arrivals: list[str]) -> None:
    peak = {name: max(r["qps"] for r in results[name]) for name in ("unbatched", "batched")}
    single_p50 = min(results["batched"], key=lambda r: r["c"])["p50"]
    half = results["half"]
    first = half[arrivals[0]]
    errors = sum(r["errors"] for name in ("unbatched", "batched") for r in results[name])
    errors += sum(h["errors"] for h in half.values())
    figures = {
        "batched/unbatched QPS": peak["batched"] / peak["unbatched"],
        "p99 at half saturation / single p50": first["p99"] / single_p50,
        **{
            f"p99 at half saturation ({a} arrivals) / single p50": half[a]["p99"] / single_p50
            for a in arrivals[1:]
        },
        "served/in-process single-request latency": single_p50 / local["single_p50"],
        "served batched/in-process batched QPS": peak["batched"] / local["batched_qps"],
        "served batched/in-process single QPS": peak["batched"] / local["single_qps"],
    }
    print(f"figures (half saturation: {arrivals[0]} arrivals at {first['rate']:.1f}/s):")
    for name, value in figures.items():
        goal = GOALS.get(name)
        verdict = ""
        if goal is not None:
            met = value >= goal if name.startswith("batched/") else value <= goal
            verdict = f"  goal {'>=' if name.startswith('batched/') else '<='} {goal}: " + (
                "met" if met else "NOT met"
            )
        print(f"  {name}: {value:.2f}{verdict}")
    print(f"  errors: {errors}  goal 0")


if __name__ == "__main__":
    main(parse_args())
