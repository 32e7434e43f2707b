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

from oclear_ray.synth import SynthConfig, generate


def ensure_data(workdir: str, *, docs: int, classes: int, seed: int = 0) -> dict:
    """WORKDIR/data/{catalog,queries,eval_queries}.parquet, drawn unless drawn already with
    the same settings (``synth.json`` records them)."""
    out = os.path.join(workdir, "data")
    config = SynthConfig(docs=docs, classes=classes, noise=0.1, seed=seed)
    record = os.path.join(out, "synth.json")
    wanted = json.dumps(dataclasses.asdict(config), sort_keys=True)
    paths = {name: os.path.join(out, f"{name}.parquet") for name in ("catalog", "queries")}
    paths["eval_queries"] = os.path.join(out, "eval_queries.parquet")
    have = os.path.exists(record) and Path(record).read_text() == wanted
    if not (have and all(os.path.exists(p) for p in paths.values())):
        generate(out, config)
        Path(record).write_text(wanted)
    return paths


def first_query(path: str) -> dict:
    """The first query with an image: its id, label and image bytes."""
    table = pq.read_table(path, columns=["query_id", "label", "image"])
    for row in table.to_pylist():
        if row["image"]:
            return row
    raise ValueError(f"{path} has no query with an image")


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
