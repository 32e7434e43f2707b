"""Load test of the search app on 127.0.0.1: batched vs unbatched encoder, vs in-process.

    python bench/serve.py [--workdir W] [--data CATALOG] [--docs 2000] [--duration 6]
                          [--concurrency 1 2 4 8 16 32] [--batch-size 16]

Without ``--workdir`` a small work dir is built first (the first ``--docs`` documents of
``--data``, an untrained model of the default architecture exported as training exports it,
embedded in process, 2 FAISS shards). Queries are ``eval_queries.parquet`` photos next to the
catalog when present, else catalog images, sent as multipart uploads with ``k=10``.

For the app deployed with ``max_batch_size`` 1 (unbatched) and ``--batch-size`` (batched):
a closed-loop sweep (``c`` clients each sending the next request when the last returns) for
``--duration`` seconds per concurrency gives QPS and p50/p99 latency; then, for the batched
app, an open-loop run at half its peak QPS gives the p99 under load. The same encode + search
called in this process (one query at a time, and batches of ``--batch-size``) is the baseline.
Goals: batched >= 3x unbatched peak QPS; p99 at half saturation <= 1.5x the single-request
(c=1) p50; no errors. The load average is printed: other jobs on the machine skew the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GOALS = {"batched/unbatched QPS": 3.0, "p99 at half saturation / single p50": 1.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="existing work dir (train/model + index); default: build")
    p.add_argument("--data", default="/work/shared/data/openmoji-dev/catalog.parquet")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per load point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ingress-replicas", type=int, default=1)
    return p.parse_args(argv)


def build_workdir(out: str, data: str, docs: int) -> str:
    """A work dir over the first ``docs`` documents with an untrained default model."""
    import torch

    from oclear_ray.embed import DocEmbedder, part_path, write_part, write_summary
    from oclear_ray.export import export_model
    from oclear_ray.index import IndexConfig, local_map, sync_index
    from oclear_ray.model import ModelConfig, RetrievalModel, TextEncoderConfig
    from oclear_ray.text import train_tokenizer

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


def percentiles(latencies: list[float]) -> tuple[float, float]:
    if not latencies:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


async def closed_loop(url: str, images: list[bytes], concurrency: int, duration: float, k: int):
    """``concurrency`` clients for ``duration`` s: (completed, errors, latencies)."""
    import httpx

    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        deadline = time.perf_counter() + duration

        async def worker(seed: int):
            nonlocal errors
            i = seed
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                ok = await send(client, images[i % len(images)], k)
                if ok:
                    latencies.append(time.perf_counter() - start)
                errors += not ok
                i += concurrency

        await asyncio.gather(*(worker(s) for s in range(concurrency)))
    return len(latencies), errors, latencies


async def open_loop(url: str, images: list[bytes], rate: float, duration: float, k: int):
    """Requests at a fixed ``rate`` for ``duration`` s, latency from the scheduled send time."""
    import httpx

    latencies, errors = [], 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        t0 = time.perf_counter()

        async def one(i: int):
            nonlocal errors
            scheduled = t0 + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            ok = await send(client, images[i % len(images)], k)
            if ok:
                latencies.append(time.perf_counter() - scheduled)
            errors += not ok

        await asyncio.gather(*(one(i) for i in range(int(rate * duration))))
    return len(latencies), errors, latencies


async def send(client, image: bytes, k: int) -> bool:
    try:
        files = {"image": ("q.png", image, "image/png")}
        response = await client.post("/v1/search", files=files, data={"k": str(k)})
        return response.status_code == 200
    except Exception:  # a failed request is counted, never fatal to the bench
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(workdir: str, max_batch_size: int, url: str, ingress_replicas: int) -> None:
    import httpx
    from ray import serve

    from serve.app import build_app

    serve.run(
        build_app(
            {
                "workdir": workdir,
                "max_batch_size": max_batch_size,
                "ingress_replicas": ingress_replicas,
            }
        ),
        name="oclear",
        route_prefix="/",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    deadline = time.time() + 120
    while httpx.get(url + "/v1/health", timeout=10).status_code != 200:
        if time.time() > deadline:
            raise RuntimeError("app not ready after 120 s")
        time.sleep(0.3)


def sweep(url: str, images, args) -> list[dict]:
    rows = []
    asyncio.run(closed_loop(url, images, 2, 2.0, args.k))  # warm up
    for c in args.concurrency:
        n, errors, lat = asyncio.run(closed_loop(url, images, c, args.duration, args.k))
        p50, p99 = percentiles(lat)
        rows.append({"c": c, "qps": n / args.duration, "p50": p50, "p99": p99, "errors": errors})
        print(
            f"  c={c:3d}  QPS {n / args.duration:7.1f}  p50 {p50:7.1f} ms  "
            f"p99 {p99:7.1f} ms  errors {errors}",
            flush=True,
        )
    return rows


def in_process(workdir: str, images: list[bytes], args) -> dict:
    """The same decode + encode + search + lookup in this process: single and batched QPS."""
    import torch

    from oclear_ray.contract import Limits
    from oclear_ray.export import load_query_encoder
    from oclear_ray.search import SearchIndex
    from oclear_ray.serve import encode_queries, query_pixels

    torch.set_num_threads(1)
    encoder = load_query_encoder(os.path.join(workdir, "train", "model"))
    index = SearchIndex.load(os.path.join(workdir, "index"), encoder.model_version)
    size, limits = encoder.preprocess.image_size, Limits()

    def run(batch: int) -> tuple[float, float]:
        done, lat, deadline = 0, [], time.perf_counter() + args.duration
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            chunk = [images[(done + j) % len(images)] for j in range(batch)]
            items = [(query_pixels(b, limits, size), None) for b in chunk]
            index.search_documents(np.stack(encode_queries(encoder, items)), args.k)
            lat.append(time.perf_counter() - start)
            done += batch
        return done / args.duration, percentiles(lat)[0]

    single_qps, single_p50 = run(1)
    batched_qps, _ = run(args.batch_size)
    return {"single_qps": single_qps, "single_p50": single_p50, "batched_qps": batched_qps}


def main(args) -> None:
    # `python bench/serve.py` puts bench/ first on sys.path, where this file would shadow the
    # `serve` package: put the repository root there instead (for this process and Ray's).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(here)] + [
        p for p in sys.path if os.path.abspath(p or ".") != here
    ]
    from ray import serve

    from oclear_ray.runtime import init_ray

    print(f"load average before: {os.getloadavg()}")
    workdir = args.workdir or build_workdir(
        tempfile.mkdtemp(prefix="bench-serve-"), args.data, args.docs
    )
    images = query_images(args.data)
    local = in_process(workdir, images, args)
    print(
        f"in process: single QPS {local['single_qps']:.1f} (p50 {local['single_p50']:.1f} ms), "
        f"batch {args.batch_size} QPS {local['batched_qps']:.1f}",
        flush=True,
    )
    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    for name, batch in (("unbatched", 1), ("batched", args.batch_size)):
        deploy(workdir, batch, url, args.ingress_replicas)
        print(f"{name} (max_batch_size {batch}):", flush=True)
        results[name] = sweep(url, images, args)
        handle = serve.get_deployment_handle("QueryEncoder", app_name="oclear")
        sizes = handle.batch_sizes.remote().result()
        print(f"  encoder batches: mean {np.mean(sizes):.1f}, max {max(sizes)} queries")
        if name == "batched":
            peak = max(r["qps"] for r in results[name])
            n, errors, lat = asyncio.run(open_loop(url, images, peak / 2, args.duration, args.k))
            results["half"] = {"rate": peak / 2, "p99": percentiles(lat)[1], "errors": errors}
            print(
                f"  open loop at {peak / 2:.1f}/s: p99 {results['half']['p99']:.1f} ms, "
                f"errors {errors}"
            )
        serve.delete("oclear")
    serve.shutdown()
    report(results, local)
    print(f"load average after: {os.getloadavg()}")


def report(results: dict, local: dict) -> None:
    peak = {name: max(r["qps"] for r in results[name]) for name in ("unbatched", "batched")}
    single_p50 = results["batched"][0]["p50"]
    errors = sum(r["errors"] for name in ("unbatched", "batched") for r in results[name])
    figures = {
        "batched/unbatched QPS": peak["batched"] / peak["unbatched"],
        "p99 at half saturation / single p50": results["half"]["p99"] / single_p50,
        "served/in-process single-request latency": single_p50 / local["single_p50"],
        "served batched/in-process batched QPS": peak["batched"] / local["batched_qps"],
        "served batched/in-process single QPS": peak["batched"] / local["single_qps"],
    }
    print("figures:")
    for name, value in figures.items():
        goal = GOALS.get(name)
        verdict = ""
        if goal is not None:
            met = value >= goal if name.startswith("batched/") else value <= goal
            verdict = f"  goal {'>=' if name.startswith('batched/') else '<='} {goal}: " + (
                "met" if met else "NOT met"
            )
        print(f"  {name}: {value:.2f}{verdict}")
    print(f"  errors: {errors + results['half']['errors']}  goal 0")


if __name__ == "__main__":
    main(parse_args())
