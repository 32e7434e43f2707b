"""The class map: what training reads of governance, in a file of its own.

A class map names the classes training uses (``labels``: raw label -> class id), the rows it
moves (``doc_class``), drops (``dropped``) and the per-class sampling weights, under a version
that is a hash of its content. ``oclear_ray.govern`` writes governed maps; a map of the raw
labels stands in when there is none.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

FORMAT = "oclear-ray/class-map/v1"


def content_version(body: dict) -> str:
    """First 16 hex digits of a sha256 over the canonical JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_class_map(source) -> dict:
    """A class map from a path (local or URI) or an already loaded dict, checked."""
    if isinstance(source, dict):
        data = source
    else:
        from oclear_ray import storage

        if not storage.exists(str(source)):
            raise FileNotFoundError(f"no class map at {source}")
        data = json.loads(storage.read_bytes(str(source)))
    if data.get("format") != FORMAT:
        raise ValueError(f"class map format {data.get('format')!r} is not {FORMAT!r}")
    body = {k: v for k, v in data.items() if k != "version"}
    if data.get("version") != content_version(body):
        raise ValueError("class map version does not match its content (edited or corrupt)")
    return data


def raw_class_map(labels) -> dict:
    """A class map with no governance: sorted raw labels, one class each, no sampling."""
    names = sorted(set(labels))
    body = {
        "format": FORMAT,
        "num_classes": len(names),
        "classes": [{"id": i, "name": n, "size": None, "weight": 1.0} for i, n in enumerate(names)],
        "labels": {n: i for i, n in enumerate(names)},
        "merges": [],
        "splits": [],
        "doc_class": {},
        "relabelled": {},
        "dropped": {},
        "sampling": {"policy": "none", "cap": None},
        "config": None,
    }
    return {"version": content_version(body), **body}


RAW_LABELS = "raw"


def find_class_map(class_map, workdir: str) -> dict | None:
    """The class map training uses: ``class_map`` (a path or a loaded map) when given, else
    WORKDIR/govern/class_map.json when it exists, else None (train on the raw labels);
    ``"raw"`` asks for the raw labels even when a governed map exists."""
    from oclear_ray import storage

    if class_map == RAW_LABELS:
        return None
    if class_map is not None:
        return load_class_map(class_map)
    found = storage.join(workdir, "govern", "class_map.json")
    return load_class_map(found) if storage.exists(found) else None


def apply_class_map(batch: pa.Table, *, class_map: dict) -> pa.Table:
    """``map_batches`` function: drop the dropped rows and rewrite ``label`` to the row's class
    id as a string (its own split or relabel decision, else its raw label's class); rows whose
    label the map does not know are dropped."""
    ids = batch.column("doc_id").to_pylist() if "doc_id" in batch.column_names else None
    labels, docs, dropped = class_map["labels"], class_map["doc_class"], class_map["dropped"]
    classes = []
    for i, label in enumerate(batch.column("label").to_pylist()):
        doc = ids[i] if ids else None
        classes.append(-1 if doc in dropped else docs.get(doc, labels.get(label, -1)))
    batch = batch.filter(pa.array([k >= 0 for k in classes], pa.bool_()))
    column = pa.array([str(k) for k in classes if k >= 0], pa.string())
    return batch.set_column(batch.column_names.index("label"), "label", column)


def class_weights(class_map: dict) -> np.ndarray | None:
    """Per-class sampling weights (expected draws per document per epoch), or None."""
    if class_map["sampling"]["policy"] == "none":
        return None
    return np.array([c["weight"] for c in class_map["classes"]], np.float64)
