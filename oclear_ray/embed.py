"""Embed a catalog with the exported document encoder into parquet parts, resumably.

``WORKDIR/embed/part-NNNNN.parquet`` hold ``doc_id``, ``vector`` (fixed-size list of float32),
``model_version`` and the document metadata search returns (``image_path``, ``text``,
``category``, ``label`` and extra columns; no image bytes). Each part is written under a
temporary name and moved into place, so a part that exists is complete. A rerun (after a kill,
a storage outage, or with a catalog holding new documents) embeds only the ids no part holds yet,
after deleting the parts of any other model version. ``embed.json`` is written last: the
embeddings are complete, and it names the parts readers use (:func:`summary_parts`).

Documents are embedded in the model's own document view (``export.ExportedEncoder.doc_view``:
fused with their text, or their image alone, as the pipeline chose on validation queries).
``EmbedConfig(doc_view=...)`` embeds them the other way (the fusion ablation): such embeddings
carry the version ``<model_version>+image-only`` (or ``+fused``), so they never mix with parts
of the model's own view, an index built from them is rebuilt when the embeddings change kind, and
a server running the model refuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oclear_ray import storage

FORMAT = "oclear-ray/embeddings/v1"
SUMMARY_FILE = "embed.json"
VERSION_KEY = b"oclear.model_version"
FIRST_COLUMNS = ("doc_id", "vector", "model_version")
#: a document's embedding: fused with its text, or from its image alone
DOC_VIEWS = ("fused", "image_only")
#: the mark on the version of embeddings not made in the model's own document view
VIEW_SUFFIX = {"fused": "+fused", "image_only": "+image-only"}


def embedding_version(model_version: str, view: str, own_view: str = "fused") -> str:
    """The version embeddings carry: the model's, marked when documents were embedded in a
    view other than the model's own (``own_view``)."""
    return model_version if view == own_view else model_version + VIEW_SUFFIX[view]


@dataclass(kw_only=True)
class EmbedConfig:
    """How the catalog is embedded: the actor pool, its batches, and the size of output parts.

    ``threads_per_actor`` defaults to the actor's whole CPUs (at least 1): Ray sets
    ``OMP_NUM_THREADS`` from the CPU request, which for fractional CPUs is not what we want.
    ``use_gpu=None`` takes one GPU per actor when the cluster has GPUs. ``doc_view`` (one of
    :data:`DOC_VIEWS`) embeds documents in that view instead of the model's own.
    """

    batch_size: int = 64
    actors: int = 1
    cpus_per_actor: float = 1.0
    threads_per_actor: int | None = None
    use_gpu: bool | None = None
    rows_per_part: int = 10_000
    doc_view: str | None = None

    def __post_init__(self):
        if self.doc_view is not None and self.doc_view not in DOC_VIEWS:
            raise ValueError(f"doc_view must be one of {DOC_VIEWS}, got {self.doc_view!r}")
        for name in ("batch_size", "actors", "rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ValueError(f"threads_per_actor must be >= 1, got {self.threads_per_actor}")

    @property
    def threads(self) -> int:
        return self.threads_per_actor or max(1, int(self.cpus_per_actor))


def embedding_table(docs: pa.Table, vectors: np.ndarray, model_version: str) -> pa.Table:
    """``doc_id``, ``vector``, ``model_version``, then every metadata column but the image."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), pa.float32())
    columns = {
        "doc_id": docs.column("doc_id"),
        "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        "model_version": pa.array([model_version] * docs.num_rows, pa.string()),
    }
    for name in docs.column_names:
        if name not in columns and name != "image":
            columns[name] = docs.column(name)
    return pa.table(columns)


def vectors_of(table: pa.Table) -> np.ndarray:
    """The ``vector`` column as a float32 array [rows, dim] (zero-copy when possible)."""
    column = table.column("vector").combine_chunks()
    if column.null_count:
        raise ValueError("embeddings have null vectors")
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


class DocEmbedder:
    """``map_batches`` class: loads the document encoder once per actor on ``device``, embeds a
    batch (in half precision on a GPU: ``export.inference_autocast``) into float32 vectors.

    Input: contract rows with image bytes resolved (``read.prepare``); output:
    ``embedding_table``.
    """

    def __init__(
        self, model_dir: str, *, threads: int, device: str = "cpu", doc_view: str | None = None
    ):
        import torch

        from oclear_ray.export import load_doc_encoder

        torch.set_num_threads(threads)
        self.encoder = load_doc_encoder(model_dir)
        self.encoder.model.to(device)
        self.view = doc_view or self.encoder.doc_view
        self.version = embedding_version(
            self.encoder.model_version, self.view, self.encoder.doc_view
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch.column("image").to_pylist()
        texts = [t or "" for t in batch.column("text").to_pylist()]
        texts = texts if self.view == "fused" else None
        vectors = self.encoder.encode_doc(images, texts).cpu().numpy()
        return embedding_table(batch, vectors, self.version)


def part_path(embed_dir: str, number: int) -> str:
    return storage.join(embed_dir, f"part-{number:05d}.parquet")


def list_parts(embed_dir: str) -> list[str]:
    """Complete parts, in order (temporary files are hidden and never match)."""
    if not storage.exists(embed_dir):
        return []
    return [
        p
        for p in storage.list_files(embed_dir, (".parquet",))
        if storage.basename(p).startswith("part-")
    ]


def part_version(path: str) -> str | None:
    """The model version a part was embedded with (from its schema metadata)."""
    fs, p = storage.resolve(path)
    meta = pq.read_schema(p, filesystem=fs).metadata or {}
    value = meta.get(VERSION_KEY)
    return value.decode() if value else None


def write_part(path: str, table: pa.Table, model_version: str) -> None:
    """Write one part atomically, recording the model version in the parquet metadata."""
    schema = table.schema.with_metadata({VERSION_KEY: model_version.encode()})
    storage.write_parquet(path, [table.replace_schema_metadata(schema.metadata)], schema)


def read_parts(paths: list[str], columns: list[str] | None = None) -> pa.Table:
    """Parts concatenated in order (missing extra columns become nulls)."""
    tables = []
    for path in paths:
        fs, p = storage.resolve(path)
        tables.append(pq.read_table(p, columns=columns, filesystem=fs).replace_schema_metadata())
    return pa.concat_tables(tables, promote_options="default")


def delete_path(path: str) -> None:
    fs, p = storage.resolve(path)
    fs.delete_file(p)


def prepare_parts(embed_dir: str, model_version: str) -> tuple[pa.Array, int]:
    """Delete parts of other model versions and the summary (a run is under way).

    Returns the doc_ids already embedded by ``model_version`` and the next part number.
    """
    parts = list_parts(embed_dir)
    kept = [p for p in parts if part_version(p) == model_version]
    for stale in sorted(set(parts) - set(kept)):
        delete_path(stale)
    summary = storage.join(embed_dir, SUMMARY_FILE)
    if storage.exists(summary):
        delete_path(summary)
    done = read_parts(kept, ["doc_id"]).column("doc_id") if kept else pa.array([], pa.string())
    numbers = [int(storage.basename(p)[5:10]) for p in parts]
    return pa.chunked_array(done).combine_chunks(), max(numbers, default=-1) + 1


def drop_done(batch: pa.Table, done_ref) -> pa.Table:
    """Rows whose ``doc_id`` is not yet embedded."""
    import ray

    done = ray.get(done_ref)
    return batch.filter(pc.invert(pc.is_in(batch.column("doc_id"), value_set=done)))


def read_summary(embed_dir: str) -> dict:
    """``embed.json``: refuses embeddings whose run did not finish."""
    path = storage.join(embed_dir, SUMMARY_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"no complete embeddings under {embed_dir} ({SUMMARY_FILE} is missing): "
            "run `oclear embed` to the end first"
        )
    summary = json.loads(storage.read_bytes(path))
    if summary.get("format") != FORMAT:
        raise ValueError(f"{path}: format {summary.get('format')!r} is not {FORMAT!r}")
    if "files" not in summary:
        raise ValueError(f"{path} names no parts (an older version wrote it): rerun the embedding")
    return summary


def summary_parts(embed_dir: str, summary: dict) -> list[str]:
    """The parts ``embed.json`` names, in order: readers use these, never a listing."""
    return [storage.join(embed_dir, name) for name in summary["files"]]


def write_summary(embed_dir: str, model_version: str, dim: int, extra: dict) -> dict:
    """Count the parts and write ``embed.json`` (last), naming them: the embeddings are
    complete."""
    parts = list_parts(embed_dir)
    rows = sum(_num_rows(p) for p in parts)
    summary = {
        **extra,
        "format": FORMAT,
        "model_version": model_version,
        "dim": dim,
        "rows": rows,
        "parts": len(parts),
        "files": [storage.basename(p) for p in parts],
    }
    text = json.dumps(summary, indent=2, sort_keys=True)
    storage.write_bytes(storage.join(embed_dir, SUMMARY_FILE), text.encode())
    return summary


def _num_rows(path: str) -> int:
    fs, p = storage.resolve(path)
    return pq.read_metadata(p, filesystem=fs).num_rows


@dataclass
class EmbedResult:
    embed_dir: str
    model_version: str
    embedded: int
    skipped: int
    rows: int
    parts: int
    validation: dict


def _actor_resources(config: EmbedConfig) -> tuple[dict, str]:
    """Ray resources per actor and the torch device: one GPU (``cuda``) when asked for, or when
    the cluster has GPUs and ``use_gpu`` is None; else the CPU."""
    import ray

    use_gpu = config.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if use_gpu:
        return {"num_gpus": 1, "num_cpus": config.cpus_per_actor}, "cuda"
    return {"num_cpus": config.cpus_per_actor}, "cpu"


def encoder_pool(ds, encoder_cls, model_dir: str, config: EmbedConfig, **kwargs):
    """``ds`` through a pool of ``encoder_cls(model_dir=, threads=, device=, **kwargs)`` actors
    (``config``: actors, their resources, batch size). The class runs its encoder on ``device``
    (in half precision on a GPU: ``export.inference_autocast``).

    Blocks are first cut to one batch each (a streaming repartition), so that every actor gets
    work even when the source is one large row group, and results stream as batches finish.
    """
    from ray.data import ActorPoolStrategy

    resources, device = _actor_resources(config)
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    return ds.map_batches(
        encoder_cls,
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ActorPoolStrategy(size=config.actors),
        fn_constructor_kwargs={
            "model_dir": storage.absolute(model_dir),
            "threads": config.threads,
            "device": device,
            **kwargs,
        },
        **resources,
    )


def embed_dataset(ds, model_dir: str, config: EmbedConfig):
    """``ds`` (clean contract rows) -> embedding rows, through a pool of ``DocEmbedder``."""
    return encoder_pool(ds, DocEmbedder, model_dir, config, doc_view=config.doc_view)


def _model_info(model_dir: str) -> tuple[str, int, str]:
    """The model's version, its vectors' width and its own document view."""
    from oclear_ray.config import ModelConfig
    from oclear_ray.export import doc_view_of, read_manifest

    manifest = read_manifest(model_dir)
    dim = ModelConfig.from_dict(manifest["model"]).output_dim
    return manifest["model_version"], dim, doc_view_of(manifest)


def _pending(catalog: str, workdir: str, out: str, version: str, format: str | None):
    """The catalog's clean rows (``read.prepare``) not embedded yet, the report, the next
    part's number."""
    import ray

    from oclear_ray.contract import CATALOG
    from oclear_ray.read import prepare

    prepared = prepare(catalog, CATALOG, workdir, format=format)
    done, number = prepare_parts(out, version)
    ds = prepared.dataset()
    if len(done):
        ds = ds.map_batches(
            drop_done, fn_kwargs={"done_ref": ray.put(done)}, batch_format="pyarrow"
        )
    return ds, prepared.report, number


def embed_catalog(
    catalog: str,
    workdir: str,
    *,
    model_dir: str | None = None,
    config: EmbedConfig | None = None,
    format: str | None = None,
    progress=None,
) -> EmbedResult:
    """Embed the ids of ``catalog``'s clean copy (``read.prepare``: bad rows to
    ``WORKDIR/quarantine/``) not embedded yet into ``WORKDIR/embed/`` parts, then write
    ``embed.json``.

    ``progress(rows)`` is called after each part is written with the rows it holds. The parts
    are written here, one after another, rather than by ``Dataset.write_parquet`` in the
    workers: each is published whole and numbered in order, so a killed run leaves only whole
    parts and its rerun embeds exactly the rows they lack (Ray's writer writes files in place,
    so a killed write leaves partial ones); the rows are the vectors and ids only, a few hundred
    bytes each.
    """
    config = config or EmbedConfig()
    workdir = storage.absolute(workdir)  # Ray's actors do not run in this directory
    model_dir = storage.absolute(model_dir or storage.join(workdir, "train", "model"))
    model_version, dim, own_view = _model_info(model_dir)
    view = config.doc_view or own_view
    version = embedding_version(model_version, view, own_view)
    out = storage.join(workdir, "embed")
    ds, report, number = _pending(catalog, workdir, out, version, format)
    rows = embed_dataset(ds, model_dir, config)
    embedded = 0
    for table in rows.iter_batches(batch_size=config.rows_per_part, batch_format="pyarrow"):
        write_part(part_path(out, number), table, version)
        number, embedded = number + 1, embedded + table.num_rows
        if progress is not None:
            progress(table.num_rows)
    extra = {
        "catalog": storage.absolute(catalog),
        "validation": report.to_dict(),
        "encoder_model_version": model_version,
        "doc_view": view,
        "doc_inputs": "image+text" if view == "fused" else "image",
    }
    summary = write_summary(out, version, dim, extra)
    return EmbedResult(
        embed_dir=out,
        model_version=version,
        embedded=embedded,
        skipped=report.good - embedded,
        rows=summary["rows"],
        parts=summary["parts"],
        validation=report.to_dict(),
    )


def remove_embeddings(embed_dir: str, doc_ids) -> int:
    """Drop ``doc_ids`` from the parts (each rewritten atomically) and update ``embed.json``.

    Used by deletions, so that a later rebuild from the embeddings does not bring them back.
    Returns the number of rows removed.
    """
    summary = read_summary(embed_dir)
    value_set = pa.array(sorted(set(doc_ids)), pa.string())
    removed = 0
    for path in summary_parts(embed_dir, summary):
        fs, p = storage.resolve(path)
        table = pq.read_table(p, filesystem=fs)
        hit = pc.is_in(table.column("doc_id"), value_set=value_set)
        n = pc.sum(hit).as_py() or 0
        if n:
            write_part(path, table.filter(pc.invert(hit)), summary["model_version"])
            removed += n
    write_summary(embed_dir, summary["model_version"], summary["dim"], summary)
    return removed
