"""Readers: parquet, a folder of images with a JSONL/CSV manifest, webdataset tar shards.

Each returns a Ray Dataset in the data contract (``oclear_ray.contract``), checking the schema
before any work starts. ``prepare`` reads an input once for every stage: it runs the row checks
through Ray Data, writes the bad rows to a quarantine parquet with their reason, counts
everything, and keeps the good rows (image bytes resolved) as parquet in the work directory,
keyed by the input's fingerprint, for every later stage to read.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from oclear_ray import storage
from oclear_ray.contract import (
    CATALOG,
    CONTRACTS,
    FINGERPRINT,
    QUERIES,
    REASON,
    ROW_HASH,
    Contract,
    Limits,
    SchemaError,
    check_rows,
    check_schema,
    conform,
    good_mask,
)

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "metadata.jsonl", "metadata.csv")
_BLOCK_ROWS = 256  # rows per check task (and per block of a manifest's rows)


def detect_format(path: str) -> str:
    """Guess the reader from the path: ``parquet``, ``manifest`` or ``webdataset``."""
    path = str(path)
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".json", ".csv")):
        return "manifest"
    if lower.endswith(".tar") or "{" in path:
        return "webdataset"
    if not storage.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    if storage.is_dir(path):
        for name in MANIFEST_NAMES:
            if storage.exists(storage.join(path, name)):
                return "manifest"
        if storage.list_files(path, (".parquet",)):
            return "parquet"
        if storage.list_files(path, (".tar",)):
            return "webdataset"
    raise ValueError(
        f"cannot tell the format of {path}: expected a .parquet file or folder, a folder with "
        f"one of {', '.join(MANIFEST_NAMES)}, a .jsonl/.csv manifest, or webdataset .tar shards"
    )


def _conform_batch(batch: pa.Table, contract: Contract) -> pa.Table:
    return conform(batch, contract)


def read_parquet(path: str, contract: Contract, **read_args):
    """Read canonical parquet (``image`` bytes or ``image_path``), schema checked up front."""
    import ray.data

    files = (
        [path]
        if str(path).lower().endswith(".parquet")
        else storage.list_files(path, (".parquet",))
    )
    if not files:
        raise FileNotFoundError(f"no parquet files under {path}")
    fs, first = storage.resolve(files[0])
    check_schema(pq.read_schema(first, filesystem=fs), contract)
    ds = ray.data.read_parquet(path, include_row_hash=True, **read_args)
    return ds.map_batches(_conform_batch, fn_kwargs={"contract": contract}, batch_format="pyarrow")


def _find_manifest(path: str) -> str:
    """The manifest file itself, or the first of ``MANIFEST_NAMES`` in a folder."""
    if not storage.is_dir(path):
        return str(path)
    for name in MANIFEST_NAMES:
        if storage.exists(storage.join(path, name)):
            return storage.join(path, name)
    raise FileNotFoundError(f"no manifest ({', '.join(MANIFEST_NAMES)}) in {path}")


def _read_manifest_table(manifest: str) -> pa.Table:
    data = storage.read_bytes(manifest)
    source = pa.BufferReader(data)
    if manifest.lower().endswith(".csv"):
        # Text formats have no types: read every column as a string, ids included.
        names = pacsv.read_csv(pa.BufferReader(data)).column_names
        opts = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
        return pacsv.read_csv(source, convert_options=opts)
    if manifest.lower().endswith(".json") and data.lstrip().startswith(b"["):
        return pa.Table.from_pylist(json.loads(data))
    return pajson.read_json(source)


def _stringify(table: pa.Table, contract: Contract) -> pa.Table:
    """Cast scalar contract columns of an untyped manifest to strings (ids may parse as ints)."""
    for name in contract.names:
        if name in table.column_names and name != "image":
            typ = table.schema.field(name).type
            if pa.types.is_integer(typ) or pa.types.is_floating(typ):
                i = table.schema.get_field_index(name)
                table = table.set_column(i, name, table.column(name).cast(pa.string()))
    return table


def _absolute(path: str | None, root: str) -> str | None:
    if path is None or storage.is_uri(path) or os.path.isabs(path):
        return path
    return storage.join(root, path)


def read_manifest(path: str, contract: Contract):
    """Read images listed in a JSONL/CSV manifest (``image_path`` or ``file_name`` column).

    ``path`` is the manifest, or a folder holding ``manifest.jsonl``/``metadata.csv``/...;
    relative image paths are taken relative to the manifest's folder.
    """
    import ray.data

    manifest = _find_manifest(path)
    table = _read_manifest_table(manifest)
    if "file_name" in table.column_names and "image_path" not in table.column_names:
        table = table.rename_columns(
            ["image_path" if n == "file_name" else n for n in table.column_names]
        )
    table = _stringify(table, contract)
    check_schema(table.schema, contract)
    root = (
        manifest.rsplit("/", 1)[0]
        if storage.is_uri(manifest)
        else os.path.dirname(os.path.abspath(manifest))
    )
    if "image_path" in table.column_names:
        paths = [_absolute(p, root) for p in table.column("image_path").to_pylist()]
        i = table.schema.get_field_index("image_path")
        table = table.set_column(i, "image_path", pa.array(paths, pa.string()))
    table = conform(
        table.append_column(ROW_HASH, pa.array(range(table.num_rows), pa.uint64())), contract
    )
    # blocks of a few hundred rows, so that Ray Data tasks fetch the images in parallel
    return ray.data.from_arrow(
        [table.slice(i, _BLOCK_ROWS) for i in range(0, max(1, table.num_rows), _BLOCK_ROWS)]
    )


def _from_webdataset(batch: pa.Table, contract: Contract) -> pa.Table:
    """Map img2dataset samples (jpg/png/webp + txt + json per key) onto the contract."""
    cols = batch.column_names
    rows = batch.to_pylist()
    out = {name: [] for name in contract.names}
    out["url"], out[ROW_HASH] = [], []
    for row in rows:
        meta = json.loads(row["json"]) if "json" in cols and row.get("json") else {}
        image = next((row[e] for e in ("jpg", "jpeg", "png", "webp") if row.get(e)), None)
        text = row["txt"].decode("utf-8", "replace") if row.get("txt") else meta.get("caption")
        values = {
            contract.id_column: str(
                meta.get(contract.id_column) or meta.get("key") or row["__key__"]
            ),
            "image": image,
            "text": text,
            "category": meta.get("category"),
            "label": None if meta.get("label") is None else str(meta["label"]),
        }
        for name in contract.names:
            out[name].append(values.get(name))
        out["url"].append(meta.get("url"))
        out[ROW_HASH].append(f"{row.get('__url__')}#{row['__key__']}")
    return conform(pa.table(out), contract)


def read_webdataset(path: str, contract: Contract):
    """Read webdataset tar shards as img2dataset writes them (.tar, brace pattern or folder)."""
    import ray.data

    paths = storage.list_files(path, (".tar",)) if storage.is_dir(path) else path
    ds = ray.data.read_webdataset(paths, decoder=None)
    return ds.map_batches(
        _from_webdataset, fn_kwargs={"contract": contract}, batch_format="pyarrow"
    )


READERS = {"parquet": read_parquet, "manifest": read_manifest, "webdataset": read_webdataset}


def read(path: str, contract: Contract, *, format: str | None = None):
    """Read any supported source as a Ray Dataset in ``contract``. Local paths are made
    absolute: Ray's workers do not run in this directory."""
    fmt = format or detect_format(path)
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(READERS)}")
    return READERS[fmt](storage.absolute(path), contract)


@dataclass
class ValidationReport:
    """What ``validate`` found: counts per reason and where the bad rows went."""

    kind: str
    rows: int = 0
    good: int = 0
    reasons: Counter = field(default_factory=Counter)
    quarantine_path: str = ""
    label_set: set = field(default_factory=set)
    #: for ids seen more than once, the fingerprint of the row that was kept (the first)
    kept_duplicates: dict = field(default_factory=dict)

    @property
    def quarantined(self) -> int:
        return self.rows - self.good

    @property
    def labels(self) -> int:
        return len(self.label_set)

    @property
    def usable(self) -> bool:
        return self.good > 0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "rows": self.rows,
            "good": self.good,
            "quarantined": self.quarantined,
            "reasons": dict(self.reasons),
            "labels": self.labels,
            "quarantine_path": self.quarantine_path,
        }


def _null_good_images(batch: pa.Table) -> pa.Table:
    """The image bytes of good rows dropped: only bad rows travel whole to the driver."""
    i = batch.schema.get_field_index("image")
    image = pc.if_else(good_mask(batch), pa.scalar(None, pa.binary()), batch.column(i))
    return batch.set_column(i, "image", image)


def _mark_duplicates(batch: pa.Table, id_column: str, seen: dict, report) -> pa.Table:
    """Give later rows of an id already seen the reason ``duplicate <id>``; keep the first."""
    reasons = batch.column(REASON).to_pylist()
    ids = batch.column(id_column).to_pylist()
    prints = batch.column(FINGERPRINT).to_pylist()
    for i, (reason, row_id, fp) in enumerate(zip(reasons, ids, prints, strict=True)):
        if reason is not None:
            continue
        if row_id in seen:
            reasons[i] = f"duplicate {id_column}"
            report.kept_duplicates[row_id] = seen[row_id]
        else:
            seen[row_id] = fp
    return batch.set_column(
        batch.schema.get_field_index(REASON), REASON, pa.array(reasons, pa.string())
    )


def _judge(checked, contract: Contract, quarantine_path: str, progress=None) -> ValidationReport:
    """Count the checked rows in read order (so the first of several rows with one id is the
    one kept), writing the bad ones with their reason to ``quarantine_path``."""
    report = ValidationReport(kind=contract.kind, quarantine_path=str(quarantine_path))
    seen: dict = {}
    sink = storage.ParquetSink(quarantine_path)
    rows = checked.map_batches(_null_good_images, batch_format="pyarrow")
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        batch = _mark_duplicates(batch, contract.id_column, seen, report)
        bad = pc.invert(good_mask(batch))
        sink.write(_drop_internal(batch.filter(bad)))
        good = batch.filter(good_mask(batch))
        report.label_set.update(v for v in good.column("label").to_pylist() if v)
        report.rows += batch.num_rows
        report.good += good.num_rows
        report.reasons.update(_reason_kind(r) for r in batch.column(REASON).to_pylist() if r)
        if progress is not None:
            progress(batch.num_rows)
    if report.rows == 0:
        raise SchemaError(f"{contract.kind} has no rows")
    sink.close()
    return report


def _kept_rows(batch: pa.Table, id_column: str, kept: dict) -> pa.Table:
    """The good rows, and of a duplicated id only the row ``_judge`` kept; internal columns
    dropped. Readers give every row a ``row_hash`` (source and position), so exactly one of
    several rows with one id passes, even when their contents are identical."""
    ids = batch.column(id_column).to_pylist()
    prints = batch.column(FINGERPRINT).to_pylist()
    keep = [
        ok and (row_id not in kept or kept[row_id] == fp)
        for ok, row_id, fp in zip(good_mask(batch).to_pylist(), ids, prints, strict=True)
    ]
    return _drop_internal(batch.filter(pa.array(keep)).drop_columns([REASON]))


@dataclass
class Prepared:
    """A validated input: its good rows as parquet in the work directory, and the report."""

    rows_path: str
    report: ValidationReport

    def dataset(self):
        """The good rows as a Ray Dataset (image bytes resolved, nothing left to check)."""
        import ray.data

        if not self.report.good:
            raise ValueError(
                f"no usable {self.report.kind} rows (see {self.report.quarantine_path})"
            )
        fs, path = storage.resolve(self.rows_path)
        return ray.data.read_parquet(path, filesystem=fs)

    def table(self) -> pa.Table:
        """The good rows of a small input as one arrow table."""
        import ray

        tables = ray.get(self.dataset().to_arrow_refs())
        return pa.concat_tables([t for t in tables if t.num_rows], promote_options="default")


def quarantine_for(path: str, contract: Contract, workdir: str) -> str:
    """Where an input's bad rows go: ``WORKDIR/quarantine/<input name>.parquet``."""
    stem = storage.basename(str(path).rstrip("/")).split(".")[0] or contract.kind
    return storage.join(workdir, "quarantine", f"{stem}.parquet")


def prepare(
    path: str,
    contract: Contract,
    workdir: str,
    *,
    format: str | None = None,
    limits: Limits | None = None,
    quarantine: str | None = None,
    cache: str | None = None,
    progress=None,
) -> Prepared:
    """Read and check ``path`` once: its good rows go to parquet under ``cache`` (default
    ``WORKDIR/clean``), its bad rows with their reason to ``quarantine`` (default
    ``quarantine_for``), and every later stage reads the good rows from there.

    The rows are checked (every image decoded) once, by Ray Data tasks that also fetch
    ``image_path`` images, and kept in the object store until they are written by Ray Data. The
    copy is keyed by the input's ``storage.fingerprint`` (file names, sizes, modification
    times), format and limits: a call on an unchanged input reads the report and the copy, and
    copies the quarantine file to where it was asked for (``progress`` is then told all its
    rows at once); a changed input is checked again. A report written last marks a copy whole.
    """
    limits, workdir = limits or Limits(), storage.absolute(workdir)
    fmt = format or detect_format(path)
    quarantine = quarantine or quarantine_for(path, contract, workdir)
    home, source = _home(path, contract, workdir, fmt, limits, cache)
    done = storage.join(home, "report.json")
    if storage.exists(done):
        saved = json.loads(storage.read_bytes(done))
        storage.copy_file(storage.join(home, "quarantine.parquet"), quarantine)
        if progress is not None:
            progress(saved["report"]["rows"])
        report = replace(_report_of(saved["report"]), quarantine_path=str(quarantine))
        return Prepared(storage.join(home, saved["rows"]), report)
    ds = read(path, contract, format=fmt)
    ds.context.execution_options.preserve_order = True
    checked = ds.map_batches(
        check_rows,
        fn_kwargs={"contract": contract, "limits": limits},
        batch_format="pyarrow",
        batch_size=_BLOCK_ROWS,
    ).materialize()
    report = _judge(checked, contract, storage.join(home, "quarantine.parquet"), progress)
    rows = f"rows-{uuid.uuid4().hex[:8]}"  # a copy cut short by a crash is never read
    fs, rows_path = storage.resolve(storage.join(home, rows))
    kwargs = {"id_column": contract.id_column, "kept": report.kept_duplicates}
    if report.good:
        kept = checked.map_batches(_kept_rows, fn_kwargs=kwargs, batch_format="pyarrow")
        kept.write_parquet(rows_path, filesystem=fs)
    saved = {"source": source, "rows": rows, "report": _saved(report)}
    storage.write_bytes(done, json.dumps(saved).encode())
    storage.copy_file(report.quarantine_path, quarantine)
    return Prepared(storage.join(home, rows), replace(report, quarantine_path=str(quarantine)))


def _home(path, contract: Contract, workdir: str, fmt: str, limits: Limits, cache):
    """The folder of ``path``'s clean copy, and what its key is made of."""
    source = [storage.absolute(path), storage.fingerprint(path), contract.kind, fmt]
    key = hashlib.sha256(json.dumps([*source, asdict(limits)]).encode()).hexdigest()[:16]
    return storage.join(cache or storage.join(workdir, "clean"), f"{contract.kind}-{key}"), source


def adopt(path: str, contract: Contract, workdir: str, *, cache: str | None = None) -> Prepared:
    """Record ``path``, a parquet file written from rows ``prepare`` kept (a split of a clean
    copy, e.g. the probes' training queries), as its own clean copy: a later ``prepare`` of it
    checks nothing again."""
    limits, workdir = Limits(), storage.absolute(workdir)
    home, source = _home(path, contract, workdir, detect_format(path), limits, cache)
    fs, local = storage.resolve(path)
    labels = pq.read_table(local, columns=["label"], filesystem=fs).column("label")  # no images
    rows = f"rows-{uuid.uuid4().hex[:8]}"
    storage.copy_file(path, storage.join(home, rows, "part-0.parquet"))
    schema = pq.read_schema(local, filesystem=fs)
    storage.ParquetSink(storage.join(home, "quarantine.parquet"), schema).close()
    report = ValidationReport(kind=contract.kind, rows=len(labels), good=len(labels))
    report.label_set.update(v for v in labels.to_pylist() if v)
    report.quarantine_path = storage.join(home, "quarantine.parquet")
    saved = {"source": source, "rows": rows, "report": _saved(report)}
    storage.write_bytes(storage.join(home, "report.json"), json.dumps(saved).encode())
    return Prepared(storage.join(home, rows), report)


def _saved(report: ValidationReport) -> dict:
    return {
        **report.to_dict(),
        "label_set": sorted(report.label_set),
        "kept_duplicates": report.kept_duplicates,
    }


def _report_of(saved: dict) -> ValidationReport:
    return ValidationReport(
        kind=saved["kind"],
        rows=saved["rows"],
        good=saved["good"],
        reasons=Counter(saved["reasons"]),
        quarantine_path=saved["quarantine_path"],
        label_set=set(saved["label_set"]),
        kept_duplicates=saved["kept_duplicates"],
    )


def _drop_internal(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in (FINGERPRINT, ROW_HASH) if c in table.column_names])


def _reason_kind(reason: str) -> str:
    """The reason without its detail (``undecodable image: ...`` -> ``undecodable image``)."""
    return reason.split(":", 1)[0].split(" (", 1)[0]


def source_columns(path: str, fmt: str) -> list[str]:
    """Column names of a parquet or manifest source without reading its rows."""
    if fmt == "parquet":
        first = (
            path
            if str(path).lower().endswith(".parquet")
            else storage.list_files(path, (".parquet",))[0]
        )
        fs, p = storage.resolve(first)
        return pq.read_schema(p, filesystem=fs).names
    if fmt == "manifest":
        return read_manifest_columns(path)
    return []


def read_manifest_columns(path: str) -> list[str]:
    manifest = _find_manifest(path)
    return _read_manifest_table(manifest).column_names


def detect_contract(path: str, fmt: str) -> Contract:
    """Queries when the source has ``query_id`` and no ``doc_id``, else the catalog."""
    columns = source_columns(path, fmt)
    return QUERIES if "query_id" in columns and "doc_id" not in columns else CATALOG


def validate_source(
    path: str,
    *,
    kind: str = "auto",
    format: str | None = None,
    workdir: str = "work",
    quarantine: str | None = None,
    limits: Limits | None = None,
    progress=None,
) -> ValidationReport:
    """Read ``path`` with the right reader and ``prepare`` it (the ``validate`` stage: the
    stages after it read its clean copy)."""
    fmt = format or detect_format(path)
    if kind == "auto":
        contract = detect_contract(path, fmt)
    elif kind in CONTRACTS:
        contract = CONTRACTS[kind]
    else:
        raise ValueError(f"unknown kind {kind!r}; choose catalog, queries or auto")
    prepared = prepare(
        path,
        contract,
        workdir,
        format=fmt,
        limits=limits,
        quarantine=quarantine,
        progress=progress,
    )
    return prepared.report
