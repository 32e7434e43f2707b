"""The evaluate stage: retrieval metrics by label match or by judgments, written to
``WORKDIR/eval``.

A retrieved document is relevant when its label equals the query's label, or, given judgments
(``read_judgments``: the documents relevant to each query, as TREC's qrels), when the
judgments name it for the query. Metrics are plain functions over a boolean relevance matrix
``rel`` [queries, ranks] (best first) and ``R``, the number of catalog documents relevant to
each query: recall@k, MAP@R (R capped at the search depth) and nDCG@k with binary gains.
Queries with no relevant document in the catalog count as misses everywhere (their R is 0).

``evaluate`` embeds the queries with the exported query encoder (a small set in this process,
a larger one through a Ray Data actor pool), searches the index (ANN) and, for reference, the
embeddings by brute force (exact), and writes ``report.json`` and ``report.html`` (recall
curves, query -> top-k thumbnails).
``exact_search``, ``label_recall`` and ``embed_in_process`` are the small in-process helpers
(no Ray) that benchmarks use.
"""

# ruff: noqa: E741 -- FAISS naming: D, I are distances and ids
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from oclear_ray import storage
from oclear_ray.embed import DOC_VIEWS, EmbedConfig, embedding_version

NO_CATEGORY = "(none)"


#: extra neighbours ``exact_search`` looks at to break ties the same way at every ``k``
TIE_MARGIN = 8


def exact_search(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of ``xq`` against ``xb``: ``(D, I)``, equal scores in catalog
    order. FAISS orders ties by how its heap met them, which changes with ``k``: on a catalog
    with duplicate images (openmoji-dev: 410 documents, 7 % of its queries tied at the top) R@1
    moved by 1.5 points between k 1 and k 10; here it does not (for up to ``TIE_MARGIN`` tied
    documents past the k-th)."""
    import faiss

    xq, xb = (np.ascontiguousarray(x, dtype=np.float32) for x in (xq, xb))
    k = min(k, xb.shape[0])
    D, I = faiss.knn(xq, xb, min(k + TIE_MARGIN, xb.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
    order = np.lexsort((I, -D), axis=1)[:, :k]  # by score, then by catalog row
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def relevance(I: np.ndarray, query_labels, doc_labels) -> np.ndarray:
    """``rel[q, j]``: the document at rank ``j`` of query ``q`` has the query's label
    (ids of -1, past the last result, are not relevant)."""
    doc_labels = np.asarray(list(doc_labels) + [None], dtype=object)  # id -1 -> None
    found = doc_labels[np.where(I < 0, len(doc_labels) - 1, I)]
    query_labels = np.asarray(query_labels, dtype=object)[:, None]
    return (found == query_labels) & (query_labels != None)  # noqa: E711 -- elementwise


def read_judgments(path: str) -> dict[str, set[str]]:
    """Relevance judgments: a JSON object ``{query_id: [doc_id, ...]}`` naming the documents
    relevant to each query (a label can be wrong or shared by two products; a judgment is
    about the document itself)."""
    try:
        data = json.loads(storage.read_bytes(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"judgments {path}: not readable JSON ({exc})") from exc
    bad = not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(d, str) for d in v) for v in data.values()
    )
    if bad:
        raise ValueError(f"judgments {path}: want an object of query_id -> [doc_id, ...]")
    return {str(q): set(docs) for q, docs in data.items()}


def label_recall(I: np.ndarray, query_labels, doc_labels, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k: the share of queries with a document of their label among the top ``k``."""
    return recall_at(relevance(I, query_labels, doc_labels), ks)


def recall_at(rel: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """``recall@k``: the share of queries with a relevant document in the top ``k``."""
    return {f"recall@{k}": float(rel[:, :k].any(1).mean()) for k in ks}


def recall_curve(rel: np.ndarray, depth: int) -> list[float]:
    """Recall@k for k = 1..``depth`` (capped at the ranks searched)."""
    first = np.where(rel.any(1), rel.argmax(1), rel.shape[1])  # rank of the first hit
    return [float((first < k).mean()) for k in range(1, min(depth, rel.shape[1]) + 1)]


def map_at_r(rel: np.ndarray, R: np.ndarray) -> float:
    """MAP@R: per query, the mean over its first ``R`` ranks of precision@i at relevant ranks,
    divided by ``R`` (0 when R is 0). ``R`` is capped at the ranks searched."""
    R = np.minimum(np.asarray(R), rel.shape[1])
    ranks = np.arange(1, rel.shape[1] + 1)
    within = rel & (ranks[None, :] <= R[:, None])
    precision = np.cumsum(within, 1) / ranks
    ap = (precision * within).sum(1) / np.maximum(R, 1)
    return float(ap.mean())


def ndcg_at(rel: np.ndarray, R: np.ndarray, k: int = 10) -> float:
    """nDCG@k with binary gains; the ideal ranking puts ``min(R, k)`` relevant documents first."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (rel[:, :k] * discount[: rel[:, :k].shape[1]]).sum(1)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])[np.minimum(np.asarray(R), k)]
    return float(np.mean(np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)))


def per_category(rel: np.ndarray, categories, k: int = 1) -> dict[str, dict]:
    """Per query category: ``{"queries": n, "recall@k": r}``, categories sorted."""
    categories = np.asarray(categories, dtype=object)
    out = {}
    for name in sorted(set(categories.tolist())):
        mask = categories == name
        out[name] = {"queries": int(mask.sum()), f"recall@{k}": float(rel[mask, :k].any(1).mean())}
    return out


def retrieval_metrics(rel: np.ndarray, R: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """recall@k for ``ks``, ``map@r`` and ``ndcg@10`` of one ranking."""
    return {**recall_at(rel, ks), "map@r": map_at_r(rel, R), "ndcg@10": ndcg_at(rel, R, 10)}


def embed_in_process(encoder, images=None, texts=None, *, doc: bool, batch_size: int = 256):
    """Embeddings [N, D] float32 from an ``ExportedEncoder`` in batches (no Ray)."""
    n = len(images if images is not None else texts)
    out = []
    for i in range(0, n, batch_size):
        im = None if images is None else images[i : i + batch_size]
        tx = None if texts is None else texts[i : i + batch_size]
        emb = encoder.encode_doc(im, tx) if doc else encoder.encode_query(im, tx)
        out.append(emb.numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------- query embedding


def encode_queries(encoder, images: list, texts: list) -> np.ndarray:
    """Query embeddings [N, D] float32 for rows with an image, a text, or both: rows are grouped
    by what they carry, one encoder call per group (evaluation and serving alike). An image is
    encoded bytes, or uint8 pixels [S, S, 3] already fitted (``preprocess.fit_image``: serving
    decodes uploads under its limits); a text is a non-empty string."""
    from oclear_ray.preprocess import normalize

    has_image = np.array([b is not None for b in images])
    has_text = np.array([bool(t) for t in texts])
    out = None
    for with_image, with_text in ((True, True), (True, False), (False, True)):
        rows = np.flatnonzero((has_image == with_image) & (has_text == with_text))
        if not len(rows):
            continue
        im = [images[i] for i in rows] if with_image else None
        if im is not None and isinstance(im[0], np.ndarray):
            im = normalize(np.stack(im), encoder.preprocess)
        tx = [texts[i] for i in rows] if with_text else None
        emb = encoder.encode_query(images=im, texts=tx).cpu().numpy()
        out = np.zeros((len(images), emb.shape[1]), np.float32) if out is None else out
        out[rows] = emb
    missing = np.flatnonzero(~has_image & ~has_text)
    if len(missing):
        raise ValueError(f"query rows {missing[:10].tolist()} have neither image nor text")
    return out


def thumbnail(data: bytes | None, size: int = 64, *, format: str = "PNG") -> bytes | None:
    """An encoded image fitted in ``size`` x ``size``: a PNG keeping its transparency (the
    HTML reports) or, ``format="JPEG"``, transparency on white (the search page). None for
    None, an undecodable image, or one over ``contract.Limits``'s pixels (from its header)."""
    from PIL import Image

    from oclear_ray.contract import Limits

    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > Limits().max_pixels:
            return None
        image = image.convert("RGBA")  # before resizing: palette images resize smoothly too
        image.thumbnail((size, size))
        buf = io.BytesIO()
        if format == "JPEG":
            from oclear_ray.preprocess import to_rgb  # imports torch: serving has it loaded

            to_rgb(image).save(buf, format="JPEG", quality=85)
        else:
            image.save(buf, format=format)
        return buf.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):  # decoration only: skip it
        return None


def sampled(ids, rate: float) -> np.ndarray:
    """Deterministic sample of ids (crc32 below ``rate``): the queries shown in the grid."""
    cut = rate * 2**32
    return np.array([zlib.crc32(str(i).encode()) < cut for i in ids], dtype=bool)


class QueryEmbedder:
    """The query encoder, loaded once on ``device`` with ``threads`` torch threads, embedding
    queries (in half precision on a GPU: ``export.inference_autocast``) into float32 vectors:
    evaluation's ``map_batches`` class, and what the serving app's encoder replicas run.

    A batch's output: ``query_id``, ``label``, ``text``, ``vector`` and ``thumbnail`` (PNG
    bytes for the ``thumb_rate`` sample of queries the report shows, else null).
    """

    def __init__(self, model_dir: str, *, threads: int, device: str = "cpu", thumb_rate=0.0):
        import torch

        from oclear_ray.export import load_query_encoder

        torch.set_num_threads(threads)
        self.encoder = load_query_encoder(model_dir)
        self.encoder.model.to(device)
        self.thumb_rate = thumb_rate

    def encode(self, images: list, texts: list) -> np.ndarray:
        """Vectors [N, D] of queries (``encode_queries``)."""
        return encode_queries(self.encoder, images, texts)

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch.column("image").to_pylist()
        texts = [t or "" for t in batch.column("text").to_pylist()]
        vectors = self.encode(images, texts)
        ids = batch.column("query_id").to_pylist()
        show = sampled(ids, self.thumb_rate)
        thumbs = [thumbnail(b) if s else None for b, s in zip(images, show, strict=True)]
        flat = pa.array(vectors.reshape(-1), pa.float32())
        return pa.table(
            {
                "query_id": batch.column("query_id"),
                "label": batch.column("label"),
                "text": pa.array(texts, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
                "thumbnail": pa.array(thumbs, pa.binary()),
            }
        )


def embed_queries(ds, model_dir: str, config: EmbedConfig, *, thumb_rate: float = 0.0):
    """``ds`` (clean query rows) -> query embedding rows through a pool of ``QueryEmbedder``."""
    from oclear_ray.embed import encoder_pool

    return encoder_pool(ds, QueryEmbedder, model_dir, config, thumb_rate=thumb_rate)


def embed_queries_here(ds, model_dir: str, config: EmbedConfig, *, thumb_rate: float = 0.0):
    """The batches ``embed_queries`` makes, made in this process on the CPU: one
    ``QueryEmbedder`` (the same encoder and outputs) on batches of the pool's size, with its
    threads; this process's thread count is restored after. For a few queries, where starting
    the pool's actors takes longer than embedding them."""
    import torch

    threads = torch.get_num_threads()
    try:
        embedder = QueryEmbedder(model_dir, threads=config.threads, thumb_rate=thumb_rate)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=config.batch_size):
            yield embedder(batch)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the stage

FORMAT = "oclear-ray/eval/v1"
#: query sets of at most this many good rows are embedded in this process when the pool would
#: run on the CPU: the same numbers, without the seconds of starting the pool's actors
IN_PROCESS_ROWS = 2048


def _default_pool() -> EmbedConfig:
    return EmbedConfig(actors=1, cpus_per_actor=0.5, threads_per_actor=2, batch_size=64)


@dataclass(kw_only=True)
class EvalConfig:
    """What ``evaluate`` measures and shows.

    ``ks``: recall cut-offs; ``curve_depth``: ranks of the recall curves; ``max_r``: MAP@R's
    R is capped here (the search depth); ``grid_queries`` / ``grid_k``: queries shown in the
    HTML report and documents per query; ``category_level``: leading segments of the ``/``
    category path used for per-category recall; ``pool``: the query-encoder actor pool (for
    more than ``IN_PROCESS_ROWS`` queries, or on GPUs).
    """

    ks: tuple[int, ...] = (1, 5, 10)
    curve_depth: int = 20
    max_r: int = 100
    grid_queries: int = 24
    grid_k: int = 8
    category_level: int = 1
    pool: EmbedConfig = field(default_factory=_default_pool)

    def __post_init__(self):
        self.ks = tuple(self.ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {self.ks}")
        for name in ("curve_depth", "max_r", "grid_k", "category_level"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grid_queries < 0:
            raise ValueError(f"grid_queries must be >= 0, got {self.grid_queries}")

    @property
    def depth(self) -> int:
        """Ranks searched per query: enough for every cut-off, the curve, nDCG@10 and MAP@R."""
        return max(*self.ks, self.curve_depth, self.grid_k, self.max_r, 10)


@dataclass
class Catalog:
    """The embedded documents (``WORKDIR/embed``): ids, labels, categories, unit vectors."""

    doc_ids: np.ndarray
    labels: np.ndarray
    categories: np.ndarray
    vectors: np.ndarray
    summary: dict

    @classmethod
    def load(cls, embed_dir: str) -> Catalog:
        from oclear_ray.embed import read_parts, read_summary, summary_parts, vectors_of
        from oclear_ray.search import normalize

        summary = read_summary(embed_dir)
        columns = ["doc_id", "vector", "label", "category"]
        table = read_parts(summary_parts(embed_dir, summary), columns)
        return cls(
            doc_ids=np.asarray(table.column("doc_id").to_pylist(), dtype=object),
            labels=np.asarray(table.column("label").to_pylist(), dtype=object),
            categories=np.asarray(table.column("category").to_pylist(), dtype=object),
            vectors=normalize(vectors_of(table)),
            summary=summary,
        )


@dataclass
class Judge:
    """Which catalog rows are relevant to each query: those carrying its label, or with
    ``judged`` (per query, the set of rows its judgments name) those."""

    docs: Catalog
    labels: list
    judged: list[set[int]] | None = None

    @classmethod
    def of(cls, docs: Catalog, table: pa.Table, judgments: dict | None) -> Judge:
        """The judge of the queries in ``table`` (rows in its order)."""
        labels = table.column("label").to_pylist()
        if judgments is None:
            return cls(docs, labels)
        row = {d: i for i, d in enumerate(docs.doc_ids.tolist())}
        ids = table.column("query_id").to_pylist()
        judged = [{row[d] for d in judgments[q] if d in row} for q in ids]
        if not any(judged) and any(judgments[q] for q in ids):
            raise ValueError("the judgments name no document of this catalog (another catalog's?)")
        return cls(docs, labels, judged)

    @property
    def basis(self) -> str:
        return "label" if self.judged is None else "judgments"

    def relevance(self, I: np.ndarray) -> np.ndarray:
        """``rel[q, j]``: the catalog row at rank ``j`` of query ``q`` is relevant to it."""
        if self.judged is None:
            return relevance(I, self.labels, self.docs.labels)
        rel = [[r in rows for r in ranked] for rows, ranked in zip(self.judged, I, strict=True)]
        return np.array(rel, dtype=bool).reshape(I.shape)

    def counts(self) -> np.ndarray:
        """R per query: the catalog documents relevant to it."""
        if self.judged is not None:
            return np.array([len(rows) for rows in self.judged], dtype=np.int64)
        counts = Counter(self.docs.labels.tolist())
        return np.array([counts.get(label, 0) if label else 0 for label in self.labels])

    def categories(self, level: int) -> list[str]:
        """A query's category: the most common category of its relevant documents, cut to
        ``level`` segments (``(none)`` when it has none, or they have no category)."""
        cats = np.asarray([c or NO_CATEGORY for c in self.docs.categories], dtype=object)
        if self.judged is not None:
            found = [Counter(cats[sorted(rows)].tolist()) for rows in self.judged]
        else:
            by_label: dict = {}
            for label, category in zip(self.docs.labels, cats, strict=True):
                by_label.setdefault(label, Counter())[category] += 1
            found = [by_label.get(label, Counter()) for label in self.labels]
        out = []
        for counter in found:
            top = counter.most_common(1)[0][0] if counter else NO_CATEGORY
            out.append("/".join(top.split("/")[:level]))
        return out


def rows_of(index, catalog: Catalog, I: np.ndarray) -> np.ndarray:
    """Index ids -> rows of ``catalog`` (-1 for padding or ids the embeddings no longer hold)."""
    documents = index.documents
    ids = documents.column("id").to_numpy()
    row_of_doc = pc.index_in(
        documents.column("doc_id"), value_set=pa.array(catalog.doc_ids.tolist(), pa.string())
    )
    row_of_doc = row_of_doc.fill_null(-1).to_numpy(zero_copy_only=False)
    pos = np.clip(np.searchsorted(ids, I), 0, len(ids) - 1)
    known = (I >= 0) & (ids[pos] == I)
    return np.where(known, row_of_doc[pos], -1)


def _read_queries(
    queries: str,
    workdir: str,
    model_dir: str,
    config: EvalConfig,
    format,
    progress=None,
    judged: dict | None = None,
):
    """Validate (bad rows to ``WORKDIR/quarantine/``), clean and embed the queries (in this
    process when there are at most ``IN_PROCESS_ROWS``): the table of labelled query embeddings
    (with ``judged``, judgments by query id: those it judges) sorted by id, the validation
    report, the rows left out."""
    from oclear_ray.contract import QUERIES
    from oclear_ray.embed import _actor_resources
    from oclear_ray.read import prepare

    prepared = prepare(queries, QUERIES, workdir, format=format)
    report = prepared.report
    if not report.good:
        raise ValueError(f"{queries}: no usable query rows (see {report.quarantine_path})")
    ds = prepared.dataset()
    rate = min(1.0, 4 * config.grid_queries / report.good)
    here = report.good <= IN_PROCESS_ROWS and _actor_resources(config.pool)[1] == "cpu"
    if here:
        rows = embed_queries_here(ds, model_dir, config.pool, thumb_rate=rate)
    else:
        rows = embed_queries(ds, model_dir, config.pool, thumb_rate=rate).iter_batches(
            batch_format="pyarrow", batch_size=None
        )
    batches = []
    for batch in rows:
        batches.append(batch)
        if progress is not None:
            progress(batch.num_rows)
    table = pa.concat_tables(batches)
    if judged is None:
        kept = pc.fill_null(pc.not_equal(table.column("label"), ""), False)
    else:
        kept = pc.is_in(table.column("query_id"), value_set=pa.array(sorted(judged), pa.string()))
    return (
        table.filter(kept).sort_by("query_id"),
        report,
        table.num_rows - pc.sum(kept).as_py(),
    )


def check_embeddings(model_dir: str, summary: dict) -> None:
    """Refuse embeddings (of either document view) not made by the model in ``model_dir``."""
    from oclear_ray.export import doc_view_of, read_manifest

    manifest = read_manifest(model_dir)
    model_version, own = manifest["model_version"], doc_view_of(manifest)
    allowed = {embedding_version(model_version, view, own) for view in DOC_VIEWS}
    if summary["model_version"] not in allowed:
        raise ValueError(
            f"embeddings were made with model version {summary['model_version']}, not by the "
            f"model at {model_dir} ({model_version}): run `oclear embed` with it first"
        )


def grid_rate(config: EvalConfig, queries: int) -> float:
    """The share of queries sampled for the grid: about 4x ``grid_queries``, then cut."""
    return min(1.0, 4 * config.grid_queries / max(1, queries))


def _embed_catalog_in_memory(catalog_path, workdir, model_dir, pool: EmbedConfig, doc_ids):
    """The catalog embedded through Ray Data (``embed_dataset``) into memory, rows aligned to
    ``doc_ids``: the other kind of document embedding for the fusion ablation."""
    from oclear_ray.contract import CATALOG
    from oclear_ray.embed import embed_dataset, vectors_of
    from oclear_ray.read import prepare
    from oclear_ray.search import normalize

    ds = prepare(catalog_path, CATALOG, workdir).dataset()
    rows = embed_dataset(ds, model_dir, pool).select_columns(["doc_id", "vector"])
    table = pa.concat_tables(list(rows.iter_batches(batch_format="pyarrow", batch_size=None)))
    where = pc.index_in(pa.array(doc_ids.tolist(), pa.string()), value_set=table["doc_id"])
    if where.null_count:
        raise ValueError(f"{catalog_path} lacks {where.null_count} embedded documents")
    return normalize(vectors_of(table.take(where)))


def fusion_ablation(
    docs: Catalog, xq, judge: Judge, *, workdir, model_dir, config, catalog
) -> dict:
    """The same queries against the catalog embedded both ways by the same model (exact
    search): ``{"fused": metrics, "image_only": metrics}``. ``WORKDIR/embed`` holds one kind;
    the other is embedded here, from ``catalog``, through Ray Data."""
    held = "image_only" if docs.summary.get("doc_inputs") == "image" else "fused"
    other = "fused" if held == "image_only" else "image_only"
    pool = EmbedConfig(**{**asdict(config.pool), "doc_view": other})
    vectors = {
        held: docs.vectors,
        other: _embed_catalog_in_memory(catalog, workdir, model_dir, pool, docs.doc_ids),
    }
    R = judge.counts()
    out = {"search": "exact", "documents": len(docs.doc_ids)}
    for name in ("fused", "image_only"):
        _, I = exact_search(xq, vectors[name], config.depth)
        out[name] = retrieval_metrics(judge.relevance(I), R, config.ks)
    return out


def _timed(clock: dict, name: str, start: float) -> float:
    now = time.perf_counter()
    clock[name] = round(now - start, 3)
    return now


def score(ann: np.ndarray, exact: np.ndarray, judge: Judge, config: EvalConfig) -> dict:
    """The metrics of the report from ANN and exact catalog rows [queries, ranks]: the ANN
    ones at top level, ``exact``, ANN-vs-exact recall@10, per category, recall curves."""
    from oclear_ray.search import knn_overlap

    R = judge.counts()
    rel_ann, rel_exact = judge.relevance(ann), judge.relevance(exact)
    return {
        "relevance": judge.basis,
        **retrieval_metrics(rel_ann, R, config.ks),
        "exact": retrieval_metrics(rel_exact, R, config.ks),
        "ann_vs_exact": {"recall@10": knn_overlap(ann, exact, 10)},
        "per_category": per_category(rel_ann, judge.categories(config.category_level)),
        "curves": {
            "ann": recall_curve(rel_ann, config.curve_depth),
            "exact": recall_curve(rel_exact, config.curve_depth),
        },
        "queries_without_documents": int((R == 0).sum()),
    }


def provenance(workdir, queries, model_dir, catalog, config, docs: Catalog, index) -> dict:
    """What the report was made from: versions, the document view (and the validation figures
    that chose it), inputs, config, time."""
    from oclear_ray.export import doc_view_of, read_manifest

    manifest = read_manifest(model_dir)
    return {
        "format": FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_version": manifest["model_version"],
        "doc_view": doc_view_of(manifest),
        "view_choice": manifest.get("view_choice"),
        "embeddings_version": docs.summary["model_version"],
        "doc_inputs": docs.summary.get("doc_inputs", "image+text"),
        "index_version": index.manifest["version"],
        "index_factory": index.manifest.get("factory"),
        "inputs": {
            "workdir": str(workdir),
            "queries": str(queries),
            "model_dir": str(model_dir),
            "catalog": catalog,
            "config": {**asdict(config), "ks": list(config.ks)},
        },
        "n_documents": len(docs.doc_ids),
    }


def evaluate(
    workdir: str,
    queries: str,
    *,
    model_dir: str | None = None,
    config: EvalConfig | None = None,
    format: str | None = None,
    catalog: str | None = None,
    image_only_docs: bool = False,
    report_dir: str | None = None,
    tracking=None,
    progress=None,
    judgments: str | None = None,
) -> dict:
    """Evaluate retrieval of ``queries`` (labelled; ``format`` is theirs) against
    ``WORKDIR/index``; write ``WORKDIR/eval/report.json`` and ``report.html``; return the report.
    ``report_dir`` moves the report (default ``WORKDIR/eval``: what the pipeline stamps). With
    ``tracking`` (``tracking.Tracking``) the evaluation is also an MLflow run. With
    ``judgments`` (a file, ``read_judgments``) a document is relevant when they name it for the
    query, and only the queries they judge are scored.

    ``catalog`` (default: the one ``WORKDIR/embed`` was made from) gives the document
    thumbnails and, with ``image_only_docs``, the fusion ablation. ``progress(rows)`` is told
    the queries embedded.
    """
    from oclear_ray.embed import vectors_of
    from oclear_ray.search import SearchIndex, normalize

    config = config or EvalConfig()
    workdir = storage.absolute(workdir)  # Ray's actors do not run in this directory
    model_dir = storage.absolute(model_dir or storage.join(workdir, "train", "model"))
    clock, start = {}, time.perf_counter()
    docs = Catalog.load(storage.join(workdir, "embed"))
    check_embeddings(model_dir, docs.summary)
    index = SearchIndex.load(storage.join(workdir, "index"), docs.summary["model_version"])
    catalog = catalog or docs.summary.get("catalog")
    if image_only_docs and not catalog:
        raise ValueError("the fusion ablation needs the catalog: pass catalog=")
    judged = read_judgments(judgments) if judgments else None
    report = provenance(workdir, queries, model_dir, catalog, config, docs, index)
    report["inputs"]["judgments"] = judgments
    t = _timed(clock, "load_s", start)
    table, validation, left_out = _read_queries(
        queries, workdir, model_dir, config, format, progress, judged
    )
    if not table.num_rows:
        what = f"judged in {judgments}" if judged is not None else "labelled"
        raise ValueError(f"{queries}: no query is {what}: nothing to score")
    t = _timed(clock, "embed_queries_s", t)
    xq, judge = normalize(vectors_of(table)), Judge.of(docs, table, judged)
    ann = rows_of(index, docs, index.search(xq, config.depth)[1])
    t = _timed(clock, "ann_search_s", t)
    exact = exact_search(xq, docs.vectors, config.depth)[1]
    t = _timed(clock, "exact_search_s", t)
    unscored = "unlabelled_queries" if judged is None else "unjudged_queries"
    report |= {"n_queries": table.num_rows, unscored: int(left_out)}
    report |= {"validation": validation.to_dict(), **score(ann, exact, judge, config)}
    if image_only_docs:
        report["fusion_ablation"] = fusion_ablation(
            docs, xq, judge, workdir=workdir, model_dir=model_dir, config=config, catalog=catalog
        )
        t = _timed(clock, "fusion_ablation_s", t)
    rel = judge.relevance(ann)
    grid = query_grid(table, docs, ann, rel, config, validation.good, catalog, workdir)
    _timed(clock, "grid_s", t)
    report["timing_s"] = {**clock, "total_s": round(time.perf_counter() - start, 3)}
    _publish(report, grid, report_dir or storage.join(workdir, "eval"), tracking)
    return report


def _publish(report: dict, grid: list, report_dir: str, tracking) -> None:
    """report.json and report.html in ``report_dir``, and the MLflow run of ``tracking``."""
    from oclear_ray.tracking import record_evaluation

    write_report(report_dir, report, grid)
    record_evaluation(tracking, report, report_dir)


# ---------------------------------------------------------------------------- the HTML report


def document_images(catalog: str | None, doc_ids, workdir: str) -> dict:
    """doc_id -> thumbnail PNG for ``doc_ids``, read from ``catalog``'s clean copy in
    ``workdir`` (``read.prepare``; embedding made it) filtered by pyarrow: a few rows. Empty
    when there is no catalog to read."""
    import pyarrow.dataset as pads

    from oclear_ray.contract import CATALOG
    from oclear_ray.read import prepare

    wanted = pa.array(sorted(set(doc_ids)), pa.string())
    if catalog is None or not len(wanted) or not storage.exists(catalog):
        return {}
    prepared = prepare(catalog, CATALOG, workdir)
    if not prepared.report.good:
        return {}
    fs, path = storage.resolve(prepared.rows_path)
    data = pads.dataset(path, filesystem=fs, format="parquet")
    rows = data.to_table(columns=["doc_id", "image"], filter=pc.field("doc_id").isin(wanted))
    return {r["doc_id"]: thumbnail(r["image"]) for r in rows.to_pylist()}


def query_grid(table, docs: Catalog, rows, rel, config: EvalConfig, good: int, catalog, workdir):
    """The queries shown in the report (a deterministic sample, at most ``grid_queries``) with
    their top ``grid_k`` documents: dicts of ids, labels, relevance and thumbnails (from
    ``catalog``'s clean copy in ``workdir``)."""
    ids = table.column("query_id").to_pylist()
    shown = np.flatnonzero(sampled(ids, grid_rate(config, good)))[: config.grid_queries]
    k = min(config.grid_k, rows.shape[1])
    hits = rows[shown, :k]
    images = document_images(catalog, docs.doc_ids[hits[hits >= 0]].tolist(), workdir)
    labels, texts = table.column("label").to_pylist(), table.column("text").to_pylist()
    thumbs = table.column("thumbnail").to_pylist()
    grid = []
    for q, found in zip(shown, hits, strict=True):
        ranked = [
            {
                "doc_id": docs.doc_ids[r],
                "label": docs.labels[r],
                "relevant": bool(rel[q, j]),
                "thumbnail": images.get(docs.doc_ids[r]),
            }
            for j, r in enumerate(found)
            if r >= 0
        ]
        grid.append(
            {
                "query_id": ids[q],
                "label": labels[q],
                "text": texts[q],
                "thumbnail": thumbs[q],
                "hits": ranked,
            }
        )
    return grid


def write_report(eval_dir: str, report: dict, grid: list[dict]) -> None:
    """``report.json`` and ``report.html``, each written atomically."""
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    storage.write_bytes(storage.join(eval_dir, "report.html"), render_html(report, grid).encode())
    storage.write_bytes(storage.join(eval_dir, "report.json"), text.encode())


def _data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def recall_svg(curves: dict[str, list[float]], width: int = 480, height: int = 260) -> str:
    """Recall@k curves as an inline SVG (k on x, recall 0..1 on y)."""
    left, bottom, top, right = 40, 30, 10, 110
    depth = max((len(c) for c in curves.values()), default=1)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(k: int, r: float) -> str:
        x = left + plot_w * (k - 1) / max(1, depth - 1)
        return f"{x:.1f},{top + plot_h * (1 - r):.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick}</text>'
        )
    for k in sorted({1, 5, 10, depth} & set(range(1, depth + 1))):
        x, _ = xy(k, 0).split(",")
        parts.append(
            f'<text x="{x}" y="{height - 12}" font-size="10" text-anchor="middle">{k}</text>'
        )
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 1}" font-size="10">k</text>')
    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
    for i, (name, curve) in enumerate(curves.items()):
        points = " ".join(xy(k, r) for k, r in enumerate(curve, 1))
        colour, dash = colours[i % len(colours)], 6 * i  # later curves dashed: overlaps show
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
            f'stroke-dasharray="{dash} {dash}" points="{points}"/>'
            f'<text x="{left + plot_w + 8}" y="{top + 14 * (i + 1)}" font-size="11" '
            f'fill="{colour}">{html.escape(name)}</text>'
        )
    return "".join(parts) + "</svg>"


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _tile(item: dict, caption: str, css: str) -> str:
    uri = _data_uri(item.get("thumbnail"))
    inner = f'<img src="{uri}" alt="">' if uri else '<div class="noimg">no image</div>'
    return f'<figure class="{css}">{inner}<figcaption>{html.escape(caption)}</figcaption></figure>'


def grid_html(grid: list[dict]) -> str:
    """One line per query: the query, then its ranked documents (green: relevant)."""
    lines = []
    for q in grid:
        caption = f"{q['query_id']} [{q['label']}]" + (f" “{q['text']}”" if q["text"] else "")
        tiles = [_tile(q, caption, "query")]
        tiles += [
            _tile(h, f"{h['doc_id']} [{h['label']}]", "hit" if h["relevant"] else "miss")
            for h in q["hits"]
        ]
        lines.append(f'<div class="row">{"".join(tiles)}</div>')
    return f'<div class="grid">{"".join(lines)}</div>'


STYLE = """body{font-family:sans-serif;margin:20px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.row{display:flex;gap:6px;
margin:6px 0}figure{margin:0;width:84px;font-size:9px;text-align:center;word-break:break-all}
figure img,.noimg{width:64px;height:64px;border:3px solid #999}.hit img,.hit .noimg{
border-color:#2a2}.miss img,.miss .noimg{border-color:#d33}.query img{border-color:#36c}
.noimg{display:inline-block;background:#eee;font-size:9px}"""


def _view_line(report: dict) -> str:
    """The model's document view, and the validation R@1 that chose it."""
    choice = report.get("view_choice")
    if not choice:
        return f"{report['doc_view']} (not chosen on validation queries)"
    figures = ", ".join(f"{k} {v:.3f}" for k, v in choice["recall@1"].items())
    weight, levels = choice["shape_weight"], choice.get("shape_levels")
    code = f"shape weight {weight:g}" + (f" on {levels} levels" if levels else "")
    gain = choice.get("fused_gain")
    versus = (
        f"; fused documents {gain['recall@1']:+.3f} ± {gain['se']:.3f} over image-only"
        if gain
        else ""
    )
    return f"{report['doc_view']}, {code} (validation R@1 {figures}{versus})"


def _basis(report: dict) -> str:
    """How the report counts a hit."""
    judgments = report["inputs"].get("judgments")
    return f"judged relevant in {judgments}" if judgments else "label match"


def render_html(report: dict, grid: list[dict]) -> str:
    """A self-contained page (no network resources): versions, metrics, curves, categories,
    and the query -> top-k grid."""
    names = [k for k in report if k.startswith("recall@")] + ["map@r", "ndcg@10"]
    metrics = [["ANN (index)", *(report[n] for n in names)]]
    metrics.append(["exact", *(report["exact"][n] for n in names)])
    for name in ("fused", "image_only"):
        if "fusion_ablation" in report:
            row = report["fusion_ablation"][name]
            metrics.append([f"exact, {name} documents", *(row[n] for n in names)])
    categories = [[c, v["queries"], v["recall@1"]] for c, v in report["per_category"].items()]
    info = [
        ["model version", report["model_version"]],
        ["document view", _view_line(report)],
        ["embeddings", f"{report['embeddings_version']} ({report['doc_inputs']})"],
        ["index version", f"{report['index_version']} ({report['index_factory']})"],
        ["queries / documents", f"{report['n_queries']} / {report['n_documents']}"],
        ["ANN vs exact recall@10", f"{report['ann_vs_exact']['recall@10']:.4f}"],
        ["created", report["created"]],
    ]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>oclear-ray eval</title>"
        f"<style>{STYLE}</style></head><body><h1>Retrieval evaluation</h1>"
        f"{_table(['', ''], info)}<h2>Metrics ({_basis(report)})</h2>"
        f"{_table(['search', *names], metrics)}<h2>Recall@k</h2>"
        f"{recall_svg({'ANN': report['curves']['ann'], 'exact': report['curves']['exact']})}"
        f"<h2>Per category</h2>{_table(['category', 'queries', 'recall@1'], categories)}"
        f"<h2>Queries and their top documents</h2>{grid_html(grid)}</body></html>"
    )
