"""The document view, chosen per catalog on training queries held out for validation.

A catalog's documents can be embedded fused with their text or from their image alone, and the
shape code (``model.ShapeCode``) of grey or of ink levels kept beside the learned embedding at
some weight or left out; which is better depends on the catalog (its text, its queries'
renderings). ``validation_split`` holds a share of the training queries out of training (by
class, or by photo); after training, ``choose_views`` scores each setting on them and
``export.revise`` records the best in the export. No evaluation query takes part.
``validation_recall`` is governance's probe figure on the same split.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from oclear_ray import storage

#: how the validation queries are held out: unseen classes, new photos of seen ones, or none
VIEW_SPLITS = ("class", "photo", "off")


@dataclass
class Split:
    """Training queries with some held out for validation."""

    train_path: str  # the rest of the training queries, as a clean copy (``read.adopt``)
    val: object  # the held-out photos, each distinct (image, label) once (a pyarrow Table)
    docs: object  # the catalog's clean rows (a pyarrow Table)
    by: str  # "class" or "photo"


def validation_split(
    queries: str | None, catalog: str, workdir: str, *, share: float, by: str
) -> Split | None:
    """``share`` of the training queries held out by a hash: of their label (``by``
    "class": those classes reach training through their documents only, as a new catalog's
    do) or of their id ("photo": every class keeps at least one photo). None without training
    queries, or when one side would be empty. Reads the pipeline's clean copies (WORKDIR/clean,
    ``read.prepare``); the rest is recorded as a clean copy itself, so it is not checked
    again. A held-out photo identical to another of its class (the same bytes) is dropped
    from validation (``distinct``)."""
    import pyarrow.compute as pc

    from oclear_ray.contract import CATALOG, QUERIES
    from oclear_ray.read import adopt, prepare

    if queries is None:
        return None
    out, cache = storage.join(workdir, "validation", by), storage.join(workdir, "clean")
    queries = prepare(queries, QUERIES, out, cache=cache).table()
    ids, labels = queries.column("query_id").to_pylist(), queries.column("label").to_pylist()
    held = held_out(ids, labels, share, by)
    photo = pc.invert(pc.is_null(queries.column("image"))).to_pylist()
    val = queries.filter([h and p for h, p in zip(held, photo, strict=True)])
    val = val.filter(distinct(val.column("image").to_pylist(), val.column("label").to_pylist()))
    train_queries = queries.filter([not h for h in held])
    if not val.num_rows or not train_queries.num_rows:
        return None
    train_path = storage.join(out, "train_queries.parquet")
    storage.write_parquet(train_path, [train_queries], train_queries.schema)
    adopt(train_path, QUERIES, out, cache=cache)  # clean rows already: not checked again
    docs = prepare(catalog, CATALOG, out, cache=cache).table()
    return Split(train_path, val, docs, by)


def distinct(images: list, labels: list) -> list[bool]:
    """The first of each group of queries with the same image bytes and label: a copy is no
    new measurement. On openmoji-dev every class's line art is one drawing shared by its
    variants (1,235 distinct of 2,260 training queries), so without this one couple's 26 skin
    tones would weigh 26 times in each validation figure, one coin flip moving R@1 by 6
    points."""
    seen, first = set(), []
    for key in zip(images, labels, strict=True):
        first.append(key not in seen)
        seen.add(key)
    return first


def held_out(ids: list, labels: list, share: float, by: str) -> list[bool]:
    """Which queries are held out: those whose label (``by`` "class") or id ("photo") hashes
    below ``share``; an unlabelled query never is, and by photo a class whose photos were all
    drawn keeps its first."""
    cut = int(share * 1000)
    keys = labels if by == "class" else ids
    pairs = zip(keys, labels, strict=True)
    held = [bool(v) and zlib.crc32(str(k).encode()) % 1000 < cut for k, v in pairs]
    if by == "photo":
        kept = {v for v, h in zip(labels, held, strict=True) if not h}
        for i, v in enumerate(labels):
            if held[i] and v not in kept:
                held[i] = False
                kept.add(v)
    return held


def _classes(docs, queries, class_map: dict):
    """Each document's class and each query's (``class_map``'s; a dropped document is -1,
    relevant to nothing; a query of an unknown label -2)."""
    import numpy as np

    def class_of(doc_id, label):
        if doc_id in class_map["dropped"]:
            return -1
        return class_map["doc_class"].get(doc_id, class_map["labels"].get(label, -1))

    ids, doc_labels = docs.column("doc_id").to_pylist(), docs.column("label").to_pylist()
    doc_class = np.array([class_of(d, v) for d, v in zip(ids, doc_labels, strict=True)])
    want = np.array([class_map["labels"].get(v, -2) for v in queries.column("label").to_pylist()])
    return doc_class, want


def validation_recall(model_dir: str, docs, queries, class_map: dict) -> dict:
    """R@1 of ``queries`` (photos) against ``docs`` (image + text), exact search, relevance by
    ``class_map`` class."""
    from oclear_ray.evaluate import embed_in_process, exact_search
    from oclear_ray.export import load_doc_encoder, load_query_encoder

    texts = [t or "" for t in docs.column("text").to_pylist()]
    xb = embed_in_process(
        load_doc_encoder(model_dir), docs.column("image").to_pylist(), texts, doc=True
    )
    xq = embed_in_process(
        load_query_encoder(model_dir), queries.column("image").to_pylist(), doc=False
    )
    _, I = exact_search(xq, xb, 1)
    doc_class, want = _classes(docs, queries, class_map)
    return {"recall@1": float((doc_class[I[:, 0]] == want).mean()), "queries": len(want)}


#: the shape-code weights a view choice scores beside the config's own (and 0, no code)
SHAPE_WEIGHTS = (1.0, 2.0, 4.0)


def choose_views(model_dir: str, split: Split, weight: float) -> dict:
    """The document view (fused or image-only) and shape code (on grey or on ink levels, at the
    config's ``weight`` or one of ``SHAPE_WEIGHTS``, or left out) chosen on validation R@1
    (``pick_setting``): the held-out photos search the whole catalog exactly, relevance by the
    trained class map. Every input is embedded once, the learned part and the shape codes
    apart, joined per setting (``model.RetrievalModel._with_shape``)."""
    from oclear_ray.classmap import load_class_map
    from oclear_ray.evaluate import exact_search

    class_map = load_class_map(storage.join(model_dir, "class_map.json"))
    parts = _learned_and_shape(model_dir, split.docs, split.val)
    codes = parts["shape"] if weight else {}  # the export's own levels first
    weights = [weight, *(w for w in SHAPE_WEIGHTS if w != weight)] if codes else []
    doc_class, want = _classes(split.docs, split.val, class_map)
    settings, hits = {}, {}
    for view in ("fused", "image_only"):
        for w, levels in [*((w, lv) for lv in codes for w in weights), (0.0, None)]:
            code_q, code_d = codes.get(levels, (None, None))
            xq, xb = joined(parts["query"], code_q, w), joined(parts[view], code_d, w)
            _, I = exact_search(xq, xb, 1)
            key = setting_key(view, w, levels)
            settings[key] = (view, w, levels)
            hits[key] = doc_class[I[:, 0]] == want
    chosen, fused_gain = pick_setting(hits, want)
    view, w, levels = settings[chosen]
    return {
        "doc_view": view,
        "shape_weight": float(w),
        "shape_levels": levels,
        "recall@1": {k: float(v.mean()) for k, v in hits.items()},
        "fused_gain": fused_gain,
        "queries": int(len(want)),
        "held_out_by": split.by,
    }


def pick_setting(hits: dict, classes) -> tuple[str, dict]:
    """The setting (a ``setting_key``) to embed with, from each setting's hits (a bool per
    validation query) and the queries' classes; ``hits`` lists fused settings first, the
    export's own first of all. The best R@1 wins (a tie keeps the earlier); fused documents only
    when they beat the best image-only setting by more than one standard error of the
    difference, clustered by class (one standard error rule: text the queries lack must earn
    its place). A class's queries rise and fall together (photos of one product, logos of one
    brand drawn alike), so the error is that of the per-class sums, not of independent
    queries. Also returns that comparison: ``{"recall@1", "se"}``."""
    import numpy as np

    recall = {k: float(v.mean()) for k, v in hits.items()}  # max() keeps the first of equals
    best = max(recall, key=recall.get)
    alone = max((k for k in recall if k.startswith("image_only@")), key=recall.get)
    fused = max((k for k in recall if not k.startswith("image_only@")), key=recall.get)
    diff = hits[fused].astype(float) - hits[alone].astype(float)
    sums = np.bincount(np.unique(np.asarray(classes), return_inverse=True)[1], weights=diff)
    n, m = len(diff), len(sums)
    se = float(np.sqrt(m / (m - 1) * ((sums - sums.mean()) ** 2).sum()) / n) if m > 1 else 0.0
    gain = {"recall@1": recall[fused] - recall[alone], "se": se}
    if best == fused and gain["recall@1"] <= se:
        best = alone
    return best, gain


def setting_key(view: str, weight: float, levels: str | None) -> str:
    """How a view choice names one setting: ``fused@2:ink``, ``image_only@0`` (no code)."""
    return f"{view}@{weight:g}" + (f":{levels}" if weight else "")


def joined(learned, code, weight: float):
    """The learned part with the shape code beside it at ``weight``, unit rows."""
    import numpy as np

    if not weight or code is None:
        return learned
    out = np.hstack([learned, weight * code]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _learned_and_shape(model_dir: str, docs, queries) -> dict:
    """The learned embeddings of the held-out photos and of the documents (fused and
    image-only) without the shape code, and the shape codes of both on each of
    ``SHAPE_LEVELS`` (``{levels: (photos, documents)}``, empty without a code)."""
    import dataclasses

    from oclear_ray.config import SHAPE_LEVELS
    from oclear_ray.evaluate import embed_in_process
    from oclear_ray.export import load_doc_encoder, load_query_encoder
    from oclear_ray.model import ShapeCode

    query, doc = load_query_encoder(model_dir), load_doc_encoder(model_dir)
    config = doc.model.config
    has_code = doc.model.shape is not None
    query.model.shape = doc.model.shape = None  # the learned part alone
    images, texts = docs.column("image").to_pylist(), docs.column("text").to_pylist()
    photos = queries.column("image").to_pylist()

    shape = {}
    own = config.shape.levels
    for levels in sorted(SHAPE_LEVELS, key=lambda lv: lv != own) if has_code else ():
        code = ShapeCode(dataclasses.replace(config.shape, levels=levels), config.preprocess)
        shape[levels] = (shape_codes(code, query, photos), shape_codes(code, doc, images))
    return {
        "query": embed_in_process(query, photos, doc=False),
        "fused": embed_in_process(doc, images, [t or "" for t in texts], doc=True),
        "image_only": embed_in_process(doc, images, None, doc=True),
        "shape": shape,
    }


def shape_codes(code, encoder, images: list):
    """``code`` (a ``model.ShapeCode``) of ``images`` preprocessed as ``encoder`` does: an
    array, a row an image."""
    import torch

    with torch.inference_mode():
        rows = [code(encoder.images(images[i : i + 256])) for i in range(0, len(images), 256)]
    return torch.cat(rows).numpy()
