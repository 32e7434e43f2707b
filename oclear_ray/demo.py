"""``oclear demo``: a small synthetic catalog, the whole pipeline, the served page, one search.

The helpers here are the demo's own steps: draw the data once (a rerun keeps it, so the
pipeline's stages stay current), wait for the app, search it over HTTP like a client would.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from oclear_ray.synth import SynthConfig, generate, more_photos

#: the held-out-class evaluation's report, in the work directory (the pipeline's is eval/)
HELD_OUT_DIR = "eval-held-out"

#: the demo's training recipe over the CPU default (``--set`` pairs): a ResNet at 32 px, which
#: learns user photos in a few CPU minutes (3.3x the samples/s of 64 px), photo-like views of
#: the documents for the query tower (``data.doc_as_query_rate``, ``doc_query_view``) and fresh
#: photo-like views of the training photos every pass (``data.augment``). Chosen with
#: ``bench/recipe.py --split photo`` on held-out training photos of the demo's catalog
#: (bench/README.md: at 300 steps R@1 0.83, against 0.71 for the same ResNet at 64 px and 0.21
#: for convnext_atto at 64 px on the old 100-product catalog; at 500 steps, as many samples as
#: the demo now trains, the views of the photos 0.904 against 0.865 without); the shape code's
#: weight is then chosen by the pipeline (``views``). The backbone sees colour: the demo's
#: products differ by colour (the CPU default's grey levels were not measured on it)
RECIPE = (
    "model.image.name=resnet10t",
    "model.image.levels=rgb",
    "model.preprocess.image_size=32",
    "data.doc_as_query_rate=0.5",
    "data.doc_query_view=photo",
    "data.augment=true",
)


def ensure_data(
    workdir: str, *, docs: int, classes: int, queries_per_class: int = 2, seed: int = 0
) -> dict:
    """WORKDIR/data/{catalog,queries,eval_queries,new_photos}.parquet, truth.json,
    new_photos.json (query_id -> product) and the judgments of both evaluations
    (``{new_photos,eval_queries}_judgments.json``), drawn unless drawn already with the same
    settings (``synth.json`` records them).

    ``new_photos`` are fresh photos of the products that have training photos (as many per
    product as it has training photos): a user photographing a catalog product. ``eval_queries``
    are photos of products never seen in a photo (held-out classes)."""
    out = os.path.join(workdir, "data")
    config = SynthConfig(
        docs=docs, classes=classes, queries_per_class=queries_per_class, noise=0.1, seed=seed
    )
    record = os.path.join(out, "synth.json")
    wanted = json.dumps(dataclasses.asdict(config), sort_keys=True)
    names = ("catalog", "queries", "eval_queries", "new_photos")
    paths = {name: os.path.join(out, f"{name}.parquet") for name in names}
    paths["truth"] = os.path.join(out, "truth.json")
    paths["new_photos_products"] = os.path.join(out, "new_photos.json")
    for name in ("new_photos", "eval_queries"):
        paths[f"{name}_judgments"] = os.path.join(out, f"{name}_judgments.json")
    have = os.path.exists(record) and Path(record).read_text() == wanted
    if not (have and all(os.path.exists(p) for p in paths.values())):
        generate(out, config)
        truth = json.loads(Path(paths["truth"]).read_text())
        trained = pq.read_table(paths["queries"], columns=["query_id"]).column(0).to_pylist()
        products = sorted({truth["query_product"][q] for q in trained})
        shown = more_photos(paths["new_photos"], config, products, per_product=queries_per_class)
        Path(paths["new_photos_products"]).write_text(json.dumps(shown))
        seen = set(trained)
        held = {q: p for q, p in truth["query_product"].items() if q not in seen}
        for name, photos in (("new_photos", shown), ("eval_queries", held)):
            text = json.dumps(judgments(truth, photos), sort_keys=True)
            Path(paths[f"{name}_judgments"]).write_text(text)
        Path(record).write_text(wanted)
    return paths


def judgments(truth: dict, photographed: dict) -> dict:
    """``{query_id: [doc_id, ...]}``: the documents of the product each photo shows (by the
    synthetic truth: a document's label can be wrong or shared, its product cannot)."""
    docs: dict = {}
    for doc, product in truth["doc_product"].items():
        docs.setdefault(product, []).append(doc)
    return {q: sorted(docs.get(p, [])) for q, p in photographed.items()}


def evaluate_held_out(cfg, queries: str, judgments: str) -> dict:
    """The pipeline's model and index (``cfg``: its ``PipelineConfig``) evaluated on photos
    of products that had no training photo, a hit being a document of the photographed
    product (``judgments``); report in WORKDIR/eval-held-out, tracked like the pipeline's
    evaluation."""
    from oclear_ray.evaluate import evaluate

    return evaluate(
        cfg.workdir,
        queries,
        config=cfg.eval,
        catalog=cfg.catalog,
        report_dir=os.path.join(cfg.workdir, HELD_OUT_DIR),
        tracking=cfg.tracking,
        judgments=judgments,
    )


def first_query(path: str) -> dict:
    """The first query with an image: its id, label and image bytes."""
    table = pq.read_table(path, columns=["query_id", "label", "image"])
    for row in table.to_pylist():
        if row["image"]:
            return row
    raise ValueError(f"{path} has no query with an image")


def shows_product(paths: dict, query_id: str, hit: dict) -> bool:
    """Whether ``hit`` is a document of the product that new photo ``query_id`` shows (by the
    synthetic truth: a document's label can be wrong, its product cannot)."""
    truth = json.loads(Path(paths["truth"]).read_text())
    photographed = json.loads(Path(paths["new_photos_products"]).read_text())[query_id]
    return truth["doc_product"][hit["doc_id"]] == photographed


def _request(url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_ready(url: str, timeout: float = 300.0) -> None:
    """Poll ``/v1/health`` until the index is loaded; fail with its last answer."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            status, last = _request(f"{url}/v1/health", timeout=5.0)
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s: {last}")


def search_over_http(url: str, image: bytes, *, k: int = 5) -> list[dict]:
    """POST an image as JSON (base64) to ``/v1/search``; the hits."""
    body = {"image": base64.b64encode(image).decode(), "k": k}
    status, answer = _request(f"{url}/v1/search", body)
    if status != 200:
        raise RuntimeError(f"search failed with {status}: {answer}")
    return answer["results"]
