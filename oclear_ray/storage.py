"""Paths and URIs for work directories and data: local paths or any pyarrow filesystem URI.

Every artifact is written under a temporary name and renamed into place, so a reader never sees
half a file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)``; local relative paths are made absolute."""
    path = str(path)
    if not is_uri(path):
        path = os.path.abspath(path)
    return pafs.FileSystem.from_uri(path)


def absolute(path: str) -> str:
    """``path`` made absolute when local (Ray workers and actors run in other directories)."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under ``path`` (recursively) ending in one of ``suffixes``, sorted, as URIs/paths."""
    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    found = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes)]
    if is_uri(path):
        scheme = str(path).split("://", 1)[0]
        found = [f"{scheme}://{f}" for f in found]
    return sorted(found)


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.{uuid.uuid4().hex[:8]}.tmp"


class ParquetSink:
    """Stream record batches into one parquet file, renamed into place on ``close``.

    The schema comes from the first table written, or from ``schema`` when nothing is.
    """

    def __init__(self, path: str, schema: pa.Schema | None = None):
        self.path = str(path)
        self._fs, self._final = resolve(self.path)
        self._fs.create_dir(self._final.rpartition("/")[0], recursive=True)
        self._tmp = _tmp_name(self._final)
        self._schema = schema
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self._tmp, table.schema, filesystem=self._fs)
        self._writer.write_table(table.cast(self._schema))
        self.rows += table.num_rows

    def close(self) -> str:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, self._schema, filesystem=self._fs)
        self._writer.close()
        self._fs.move(self._tmp, self._final)
        return self.path


def write_parquet(path: str, tables: Iterable[pa.Table], schema: pa.Schema) -> int:
    """Write tables to one parquet file atomically; return the number of rows."""
    sink = ParquetSink(path, schema)
    for table in tables:
        sink.write(table)
    sink.close()
    return sink.rows


def write_bytes(path: str, data: bytes) -> None:
    """Write a small file atomically."""
    fs, final = resolve(path)
    fs.create_dir(final.rpartition("/")[0], recursive=True)
    tmp = _tmp_name(final)
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, final)


def copy_dir(local_dir: str, dest: str) -> None:
    """Copy a local folder to ``dest`` (a path or URI), replacing it as a whole at the end."""
    fs, final = resolve(dest)
    tmp = _tmp_name(final.rstrip("/"))
    fs.create_dir(tmp, recursive=True)
    pafs.copy_files(os.path.abspath(local_dir), tmp, destination_filesystem=fs)
    if fs.get_file_info(final).type != pafs.FileType.NotFound:
        fs.delete_dir(final)
    fs.move(tmp, final)


def read_bytes(path: str) -> bytes:
    """Read a local path or any fsspec URI (s3://, gs://, http://, ...) in full."""
    with fsspec.open(str(path), "rb") as f:
        return f.read()
