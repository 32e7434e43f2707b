"""The search app: query decoding and limits, the shard searcher, the HTTP API in process, then
the Ray Serve app on a local cluster (search, errors, page in headless Chromium, replica kill)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from oclear_ray.cli import app as cli
from oclear_ray.contract import Limits
from oclear_ray.embed import DocEmbedder, part_path, write_part, write_summary
from oclear_ray.evaluate import encode_queries, thumbnail
from oclear_ray.export import load_query_encoder
from oclear_ray.index import IndexConfig, local_map, sync_index
from oclear_ray.preprocess import PreprocessConfig
from oclear_ray.search import SearchIndex, load_documents, read_manifest
from oclear_ray.serve import (
    Paths,
    Query,
    QueryBatcher,
    QueryError,
    SearchService,
    ShardSearcher,
    Thumbnails,
    VersionMismatch,
    build_api,
    check_versions,
    decodes_quickly,
    embedded_catalog,
    open_query_image,
    parse_k,
    query_pixels,
    search_batch,
)
from oclear_ray.synth import SynthConfig, generate
from tests.conftest import jpeg_bytes, png_bytes
from tests.tiny import export_random_model

PRE = PreprocessConfig(image_size=32)
LIMITS = Limits(max_bytes=200_000, max_pixels=1_000_000)
APP_ARGS = {"max_bytes": LIMITS.max_bytes, "max_pixels": LIMITS.max_pixels, "shard_replicas": 2}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A work dir: 100 synthetic documents embedded (in process, as the embed job's actors do)
    by an untrained model, indexed into 2 FAISS shards."""
    root = tmp_path_factory.mktemp("serve")
    generate(str(root / "data"), SynthConfig(docs=100, classes=25, seed=0))
    catalog = str(root / "data" / "catalog.parquet")
    table = pq.read_table(catalog)
    model_dir = root / "work" / "train" / "model"
    version = export_random_model(table.column("text").to_pylist(), model_dir, seed=0)
    workdir = str(root / "work")
    rows = DocEmbedder(str(model_dir), threads=1)(table)
    write_part(part_path(f"{workdir}/embed", 0), rows, version)
    write_summary(f"{workdir}/embed", version, 32, {"catalog": catalog})
    sync_index(workdir, IndexConfig(shards=2), map_fn=local_map)
    return workdir, table


# ---- without Ray ------------------------------------------------------------------------------


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` with a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + width // 8) * 64)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.mark.parametrize(
    "data, status",
    [
        (b"", 400),
        (b"GIF89a not really an image", 400),
        (b"hello, world", 400),
        (png_bytes(size=(64, 64))[:60], 400),  # truncated after the header
        (jpeg_bytes(size=(64, 64))[:200], 400),
        (b"\x00" * (LIMITS.max_bytes + 1), 413),
        (bomb_png(2000, 2000), 413),  # 4 Mpx > 1 Mpx limit, decided from the header
        (bomb_png(100_000, 100_000), 413),  # 10 Gpx: PIL's own bomb check
    ],
)
def test_bad_images_are_refused_with_their_status(data, status):
    with pytest.raises(QueryError) as err:
        open_query_image(data, LIMITS)
    assert err.value.status == status


def test_query_pixels_decodes_to_the_model_size():
    pixels = query_pixels(png_bytes(size=(50, 20), mode="RGBA", color=(0, 0, 0, 0)), LIMITS, PRE)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert (pixels == 255).all()  # transparent composited onto white, as in embedding


def test_small_uploads_decode_on_the_loop_large_or_unreadable_ones_in_a_thread():
    assert decodes_quickly(png_bytes(size=(640, 480)))
    assert decodes_quickly(png_bytes(size=(64, 64))[:60])  # header whole: fails fast inline
    assert not decodes_quickly(bomb_png(2000, 2000))  # 4 Mpx from a few bytes
    assert not decodes_quickly(bomb_png(100_000, 100_000))
    assert not decodes_quickly(b"hello, world")


@pytest.mark.parametrize("value", [0, 101, "x", "1.5", None, True, [3]])
def test_parse_k_refuses_bad_values(value):
    with pytest.raises(QueryError) as err:
        parse_k(value)
    assert err.value.status == 422


def test_encode_queries_batches_mixed_queries_like_single_ones(work):
    encoder = load_query_encoder(Paths.of(work[0]).model_dir)
    torch.set_num_threads(1)
    images = [query_pixels(b, LIMITS, PRE) for b in work[1].column("image").to_pylist()[:3]]
    pixels = [images[0], None, images[1], images[2]]
    texts = [None, "red square", "a thing", None]
    batched = encode_queries(encoder, pixels, texts)
    single = [encode_queries(encoder, [p], [t])[0] for p, t in zip(pixels, texts, strict=True)]
    np.testing.assert_allclose(batched, np.stack(single), atol=1e-5)


def test_thumbnails_fit_the_side_on_white_and_skip_unreadable_images():
    """The search page's JPEG thumbnails and the reports' PNG ones are one function."""
    clear = png_bytes(size=(256, 100), mode="RGBA", color=(0, 0, 0, 0))
    jpeg = Image.open(io.BytesIO(thumbnail(clear, 128, format="JPEG")))
    assert (jpeg.format, jpeg.size) == ("JPEG", (128, 50))
    assert min(jpeg.convert("RGB").getpixel((64, 25))) >= 250  # transparency on white
    png = Image.open(io.BytesIO(thumbnail(clear, 128)))
    assert (png.format, png.mode, png.getpixel((64, 25))[3]) == ("PNG", "RGBA", 0)
    for unreadable in (None, b"hello, world", truncated_png(), bomb_png(8000, 8000)):
        assert thumbnail(unreadable, 128, format="JPEG") is None  # 64 Mpx: never decoded


def test_shard_searchers_merged_equal_the_whole_index_and_filter_by_category(work):
    workdir, catalog = work
    index_dir = Paths.of(workdir).index_dir
    manifest = read_manifest(index_dir)
    shards = [ShardSearcher(index_dir, i, manifest["model_version"]) for i in range(2)]
    whole = SearchIndex.load(index_dir, manifest["model_version"])
    xq = np.random.default_rng(0).standard_normal((5, manifest["dim"])).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    from oclear_ray.search import merge

    D, I = merge([s.search(xq, 10) for s in shards], 10)
    D0, I0 = whole.search(xq, 10)
    np.testing.assert_array_equal(I, I0)
    prefix = catalog.column("category")[0].as_py().split("/")[0]
    docs = load_documents(index_dir, manifest)
    allowed = {
        i
        for i, c in zip(docs["id"].to_pylist(), docs["category"].to_pylist(), strict=True)
        if c == prefix or c.startswith(prefix + "/")
    }
    assert 0 < len(allowed) < len(docs)
    _, If = merge([s.search(xq, 10, prefix) for s in shards], 10)
    found = set(If[If >= 0].tolist())
    assert found and found <= allowed
    assert (If >= 0).sum(axis=1).min() == min(10, len(allowed))


def test_version_mismatch_refuses_to_start(work, tmp_path):
    workdir, catalog = work
    other = tmp_path / "model"
    export_random_model(catalog.column("text").to_pylist(), other, seed=1)
    with pytest.raises(VersionMismatch, match="re-embed and re-index"):
        check_versions(Paths.of(workdir, str(other)))
    result = CliRunner().invoke(cli, ["serve", "--workdir", workdir, "--model-dir", str(other)])
    assert result.exit_code == 2 and "version" in result.output


def local_backend(workdir: str):
    """``(encode, search)`` for ``search_batch`` over the encoder and shards in this process."""
    paths = Paths.of(workdir)
    encoder = load_query_encoder(paths.model_dir)
    version = encoder.model_version
    shards = [ShardSearcher(paths.index_dir, i, version) for i in range(2)]

    async def encode(items):
        return encode_queries(encoder, [p for p, _ in items], [t for _, t in items])

    async def search(xq, k, category):
        return [s.search(xq, k, category) for s in shards]

    return encode, search, shards


def in_process_service(workdir: str, *, load: bool = True) -> SearchService:
    """The API's service backed by the encoder and shard searchers in this process."""
    paths = Paths.of(workdir)
    model, index = check_versions(paths)
    encode, search, shards = local_backend(workdir)

    async def answer(query):
        return (await search_batch([query], encode, search))[0]

    info = {"model_version": model["model_version"], "index_version": index["version"]}
    service = SearchService(limits=LIMITS, preprocess=PRE, answer=answer, info=info)
    if load:
        docs = load_documents(paths.index_dir, index)
        service.loaded(docs, Thumbnails(docs, embedded_catalog(workdir)), [s.info for s in shards])
    return service


def test_api_answers_503_while_loading_then_searches(work):
    service = in_process_service(work[0], load=False)
    client = TestClient(build_api(service))
    image = work[1].column("image")[0].as_py()
    assert client.get("/v1/health").status_code == 503
    response = client.post("/v1/search", files={"image": ("q.png", image, "image/png")})
    assert response.status_code == 503 and "loading" in response.json()["error"]
    loaded = in_process_service(work[0])
    service.loaded(loaded.documents, loaded.thumbnails, loaded.info["shards"])
    assert client.get("/v1/health").json() == {"status": "ready"}
    response = client.post("/v1/search", files={"image": ("q.png", image, "image/png")})
    assert response.status_code == 200 and len(response.json()["results"]) == 10


def test_search_batch_answers_each_query_as_if_alone(work):
    import asyncio

    workdir, catalog = work
    service = in_process_service(workdir)
    images = [query_pixels(b, LIMITS, PRE) for b in catalog["image"].to_pylist()[:4]]
    prefix = catalog["category"][0].as_py().split("/")[0]
    queries = [
        Query(images[0], None, 3, None),
        Query(None, "blue", 7, prefix),
        Query(images[1], "red", 5, None),
        Query(images[2], None, 10, prefix),
        Query(images[3], None, 1, None),
    ]
    encode, search, _ = local_backend(workdir)
    calls = []

    async def counted(items):
        calls.append(len(items))
        return await encode(items)

    together = asyncio.run(search_batch(queries, counted, search))
    alone = [asyncio.run(service.answer(q)) for q in queries]
    assert calls == [len(queries)]  # one encoder call for the batch
    for ((D, I), (D1, I1)), q in zip(zip(together, alone, strict=True), queries, strict=True):
        assert len(I) == q.k
        np.testing.assert_array_equal(I, I1)
        np.testing.assert_allclose(D, D1, atol=1e-5)


def test_query_batcher_grows_batches_while_its_slots_are_busy():
    """Queries arriving while every slot is busy go out together when one frees; each caller
    gets its own answer; a lone query waits ``wait_s`` at most."""
    import asyncio

    calls: list[list[int]] = []
    release = None

    async def run(queries):
        calls.append(list(queries))
        await release.wait()
        return [q * 10 for q in queries]

    async def scenario():
        nonlocal release
        release = asyncio.Event()
        batcher = QueryBatcher(run, max_size=4, wait_s=0.0, slots=1)
        first = asyncio.ensure_future(batcher(0))
        await asyncio.sleep(0.01)  # query 0 is running alone, the only slot is busy
        rest = []
        for i in range(1, 7):  # arriving one by one (a batcher that forms batches before its
            rest.append(asyncio.ensure_future(batcher(i)))  # slot is free sends 6 singles)
            await asyncio.sleep(0.003)
        assert calls == [[0]]  # nothing else was sent while the slot was busy
        release.set()
        answers = await asyncio.gather(first, *rest)
        lone = QueryBatcher(run, max_size=4, wait_s=0.05, slots=1)
        start = time.perf_counter()
        assert await lone(9) == 90
        return answers, time.perf_counter() - start, (batcher.batches, batcher.queries)

    answers, lone_s, counts = asyncio.run(scenario())
    assert answers == [0, 10, 20, 30, 40, 50, 60]
    assert calls[:3] == [[0], [1, 2, 3, 4], [5, 6]]  # batches of the queue, up to max_size
    assert counts == (3, 7)
    assert 0.04 <= lone_s < 0.5


def test_query_batcher_fills_a_batch_within_its_wait_and_fails_only_that_batch():
    import asyncio

    async def run(queries):
        if "bad" in queries:
            raise ValueError("bad query in the batch")
        return [q.upper() for q in queries]

    async def scenario():
        batcher = QueryBatcher(run, max_size=8, wait_s=0.05, slots=2)
        together = [asyncio.ensure_future(batcher(q)) for q in ("a", "b", "bad")]
        results = await asyncio.gather(*together, return_exceptions=True)
        after = await batcher("c")  # the batcher still answers after a failed batch
        return results, after, batcher.batches

    results, after, batches = asyncio.run(scenario())
    assert [str(r) for r in results] == ["bad query in the batch"] * 3
    assert all(isinstance(r, ValueError) for r in results)
    assert (after, batches) == ("C", 2)
    with pytest.raises(ValueError, match="max_size 0"):
        QueryBatcher(run, max_size=0, wait_s=0.01)


def test_app_args_convert_yaml_values_and_refuse_bad_ones():
    from serve.app import AppArgs

    args = AppArgs.from_dict({"max_batch_size": "8", "encoder_wait_timeout_s": "0.002"})
    assert (args.max_batch_size, args.encoder_wait_timeout_s) == (8, 0.002)
    bad = [
        {"max_batch_size": 0},
        {"batch_wait_timeout_s": -0.1},
        {"encoder_wait_timeout_s": -1.0},
        {"encoder_cpus": 0.0},
        {"concurrent_batches": 0},
        {"num_gpus": -1},
        {"num_gpus": "1"},
        {"num_gpus": float("nan")},
    ]
    for values in bad:
        with pytest.raises(ValueError, match=next(iter(values))):
            AppArgs(**values)
    with pytest.raises(ValueError, match="unknown app args: colour"):
        AppArgs.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="num_gpus must be float, got 'one'"):
        AppArgs.from_dict({"num_gpus": "one"})
    with pytest.raises(ValueError, match="num_gpus must be a number >= 0, got -0.5"):
        AppArgs.from_dict({"num_gpus": "-0.5"})
    with pytest.raises(ValueError, match="max_batch_size must be int, got 2.5"):
        AppArgs.from_dict({"max_batch_size": 2.5})  # the config parser: no number rounded
    assert AppArgs.from_dict({"num_gpus": "0.5"}).num_gpus == 0.5


def encoder_deployment(app):
    """The ``QueryEncoder`` deployment of a built app, as Serve would deploy it."""
    from ray.serve._private.build_app import build_app as build_graph

    graph = build_graph(app, name="oclear")
    return next(d for d in graph.deployments if d.name == "QueryEncoder")


@pytest.mark.parametrize(("num_gpus", "device"), [(0, "cpu"), (1, "cuda"), (0.5, "cuda")])
def test_num_gpus_gives_the_query_encoder_gpus_and_cuda(work, num_gpus, device):
    from serve.app import build_app

    encoder = encoder_deployment(build_app({"workdir": work[0], "num_gpus": num_gpus}))
    assert encoder.ray_actor_options.get("num_gpus", 0) == num_gpus
    assert encoder.ray_actor_options["num_cpus"] == 0.25
    assert encoder.init_kwargs["device"] == device


def test_config_yaml_deploys_the_app_builder_with_its_deployments(work):
    import yaml
    from ray.serve._private.build_app import build_app as build_graph
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    path = os.path.join(os.path.dirname(__file__), "..", "serve", "config.yaml")
    with open(path) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (application,) = config.applications
    assert application.import_path == "serve.app:build_app"
    graph = build_graph(build_app({**application.args, "workdir": work[0]}), name="oclear")
    names = {d.name for d in graph.deployments}
    assert {d.name for d in application.deployments} <= names
    assert names == {"SearchIngress", "QueryEncoder", "IndexShard0", "IndexShard1"}
    # the encoder's resources follow args.encoder_cpus and args.num_gpus: an entry there
    # would replace them whole
    (entry,) = [d for d in application.deployments if d.name == "QueryEncoder"]
    assert "ray_actor_options" not in entry.model_dump(exclude_unset=True)
    assert application.args["num_gpus"] == 0


# ---- on Ray Serve -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, work):
    """The app deployed on the local Ray with Serve on 127.0.0.1 and a free port."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"workdir": work[0], **APP_ARGS}), name="oclear", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.time() + 60
        while client.get("/v1/health").status_code != 200:
            assert time.time() < deadline, "app did not become ready"
            time.sleep(0.2)
        yield client
    serve.shutdown()


def search_image(client, image: bytes, **fields):
    files = {"image": ("query.png", image, "image/png")}
    return client.post("/v1/search", files=files, data={k: str(v) for k, v in fields.items()})


def app_metrics() -> dict[str, float]:
    """The app's metrics (``ray_oclear_*``) scraped from Ray's Prometheus endpoint: sample
    name (with its ``reason`` or bucket bound ``le``) -> value summed over replicas."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray.nodes()[0]["MetricsExportPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_oclear_"):
                labels = sample.labels
                label = labels.get("reason") or ("le" in labels and f"{float(labels['le']):g}")
                key = sample.name + (f"{{{label}}}" if label else "")
                found[key] = found.get(key, 0.0) + sample.value
    return found


@pytest.mark.ray
def test_served_metrics_reach_prometheus_with_their_values(server, work):
    """Four searches one after another (k 5, 5, 5 and 3) and one upload that is not an image,
    counted from what the app had exported before them (other tests search the same app);
    Ray exports its metrics every few seconds, so the scrape is polled. (Ray's histogram
    ``_sum`` is estimated from bucket midpoints, so the buckets are what is checked.)"""
    import ray

    # Ray's export interval (tests/conftest.py sets it for the test cluster), at least 1 s
    interval = max(ray._config.metrics_report_interval_ms(), 1000) / 1000
    before = app_metrics()
    for _ in range(10):  # earlier tests' searches may not be exported yet: wait for a still scrape
        time.sleep(3 * interval)  # three exports
        now = app_metrics()
        if now == before:
            break
        before = now
    images = [work[1]["image"][row].as_py() for row in (2, 4, 6)]
    for image in images:
        assert search_image(server, image, k=5).status_code == 200
    assert server.post("/v1/search", json={"text": "red mug", "k": 3}).status_code == 200
    assert search_image(server, b"not an image").status_code == 400
    delta = {
        "ray_oclear_search_results_count": 4,
        "ray_oclear_search_results_bucket{1}": 0,
        "ray_oclear_search_results_bucket{5}": 4,  # 5, 5, 5 and 3 hits
        "ray_oclear_encode_batch_size_count": 4,  # one after another: a batch each
        "ray_oclear_encode_batch_size_bucket{1}": 4,
        "ray_oclear_encode_latency_ms_count": 4,
        "ray_oclear_search_latency_ms_count": 4,
        "ray_oclear_rejected_uploads_total{unreadable}": 1,
    }
    expected = {k: before.get(k, 0) + v for k, v in delta.items()}
    expected["ray_oclear_index_documents"] = work[1].num_rows
    deadline, got = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        got = app_metrics()
        if all(got.get(k) == v for k, v in expected.items()):
            break
        time.sleep(interval)
    assert {k: got.get(k) for k in expected} == expected
    assert got["ray_oclear_encode_latency_ms_sum"] > 0
    assert got["ray_oclear_search_latency_ms_sum"] > 0


@pytest.mark.ray
def test_served_search_equals_the_library_search_in_process(server, work):
    workdir, catalog = work
    paths = Paths.of(workdir)
    encoder = load_query_encoder(paths.model_dir)
    local = SearchIndex.load(paths.index_dir, encoder.model_version)
    for row in (0, 17, 42, 99):
        image = catalog["image"][row].as_py()
        response = search_image(server, image, k=5)
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        pixels = query_pixels(image, LIMITS, PRE)
        xq = encode_queries(encoder, [pixels], [None])
        expected = local.search_documents(xq, 5)[0]
        assert [h["doc_id"] for h in hits] == [e["doc_id"] for e in expected]
        np.testing.assert_allclose(
            [h["score"] for h in hits], [e["score"] for e in expected], atol=1e-4
        )
        again = search_image(server, image, k=5).json()["results"]
        assert again == hits  # stable
        doc = catalog.filter(pc.equal(catalog["doc_id"], hits[0]["doc_id"])).to_pylist()[0]
        assert (hits[0]["text"], hits[0]["category"]) == (doc["text"], doc["category"])


@pytest.mark.ray
def test_served_json_text_category_info_and_thumbnails(server, work):
    catalog = work[1]
    image = base64.b64encode(catalog["image"][3].as_py()).decode()
    by_json = server.post("/v1/search", json={"image": image, "k": 3}).json()["results"]
    assert by_json == search_image(server, catalog["image"][3].as_py(), k=3).json()["results"]
    text = catalog["text"][5].as_py()
    both = server.post("/v1/search", json={"image": image, "text": text, "k": 4})
    only_text = server.post("/v1/search", json={"text": text, "k": 4})
    assert both.status_code == only_text.status_code == 200
    assert len(only_text.json()["results"]) == 4
    prefix = catalog["category"][0].as_py().split("/")[0]
    filtered = server.post("/v1/search", json={"image": image, "k": 20, "category": prefix})
    categories = [h["category"] for h in filtered.json()["results"]]
    assert categories and all(c.split("/")[0] == prefix for c in categories)
    info = server.get("/v1/info").json()
    manifest = read_manifest(Paths.of(work[0]).index_dir)
    assert info["model_version"] == manifest["model_version"]
    assert info["index_version"] == manifest["version"]
    assert (info["doc_view"], info["view_choice"]) == ("fused", None)  # an export as trained
    assert [s["vectors"] for s in info["shards"]] == [e["vectors"] for e in manifest["shards"]]
    thumb = server.get(by_json[0]["thumbnail_url"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 128
    assert server.get("/v1/thumbnail", params={"doc_id": "nope"}).status_code == 404


def truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 50).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()[:-2000]


@pytest.mark.ray
def test_served_errors_have_their_status_and_the_service_stays_up(server, work):
    big = Image.effect_noise((300, 300), 80).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    assert len(buf.getvalue()) > LIMITS.max_bytes
    cases = [
        (search_image(server, b"this is not an image"), 400),
        (search_image(server, truncated_png()), 400),
        (search_image(server, buf.getvalue()), 413),
        (search_image(server, bomb_png(2000, 2000)), 413),
        (search_image(server, bomb_png(100_000, 100_000)), 413),
        (server.post("/v1/search", json={"image": "@@not base64@@"}), 400),
        (server.post("/v1/search", content=b"{not json", headers=_json()), 400),
        (server.post("/v1/search", content=b"x" * 400_000, headers=_json()), 413),
        (search_image(server, png_bytes(), k=0), 422),
        (search_image(server, png_bytes(), k="many"), 422),
        (server.post("/v1/search", json={"k": 3}), 422),
        (server.post("/v1/search", json={"text": "a", "colour": "red"}), 422),
        (server.post("/v1/search", json=[1, 2]), 422),
        (server.post("/v1/search", content=b"text=a", headers={"content-type": "text/plain"}), 415),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert response.json()["status"] == status and response.json()["error"]
    assert server.get("/v1/health").status_code == 200
    ok = search_image(server, work[1]["image"][1].as_py(), k=2)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def _json() -> dict:
    return {"content-type": "application/json"}


@pytest.mark.ray
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian chromium (.ci/run)")
def test_page_in_headless_chromium_shows_result_tiles(server, work, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "query.png"
    image.write_bytes(work[1]["image"][7].as_py())
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or CHROMEDRIVER), options=options
    )
    try:
        driver.get(str(server.base_url) + "/")
        driver.find_element(By.ID, "file").send_keys(str(image))
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys("6")
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".tile"))
        tiles = driver.find_elements(By.CSS_SELECTOR, ".tile")
        assert len(tiles) == 6
        top = search_image(server, image.read_bytes(), k=6).json()["results"]
        assert [t.get_attribute("data-doc-id") for t in tiles] == [h["doc_id"] for h in top]
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('.tile img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        assert "results" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


@pytest.mark.ray
def test_killing_a_shard_replica_under_load_loses_at_most_one_percent(server, work):
    import ray
    from ray import serve

    image = work[1]["image"][11].as_py()
    outcomes, stop = [], threading.Event()

    def client_loop():
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            while not stop.is_set():
                try:
                    outcomes.append(search_image(client, image, k=5).status_code)
                except httpx.HTTPError:
                    outcomes.append(-1)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    victim = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "IndexShard0" in a["name"] and "REPLICA" in a["name"]
    )
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join()
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert victim["name"] not in names  # really gone (Serve started another replica)
    failed = sum(code != 200 for code in outcomes)
    assert len(outcomes) > 50
    assert failed / len(outcomes) <= 0.01, f"{failed} of {len(outcomes)} failed"
    assert search_image(server, image).status_code == 200
    encoder = serve.get_deployment_handle("QueryEncoder", app_name="oclear")
    assert max(encoder.batch_sizes.remote().result()) > 1  # concurrent queries were batched
