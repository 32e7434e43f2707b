"""Paths and URIs for work directories and data: local paths or any filesystem URI.

One filesystem layer, ``pyarrow.fs``, for the whole library: Ray Data reads and writes through
pyarrow filesystems, Ray Train's ``storage_path`` is one, parquet reads and writes take one, and
pyarrow's own S3, GCS, HDFS and Azure clients (C++, no extra package) read the standard
credentials and endpoint variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Schemes
pyarrow has no client for (``http://``, ``https://``, ...) come from fsspec wrapped as a pyarrow
filesystem, so every caller sees the same API (fsspec's own s3/gcs would need s3fs/gcsfs).

Publishing: every file is written under a temporary name and moved into place (on object stores
a move of one file is a server-side copy), so a reader never sees half a file. Folders are never
moved (object stores cannot): a set of files is published file by file, its manifest last
(:func:`publish_dir`), and readers trust only what a manifest names. Storage errors (a server
that does not answer, denied access) are raised as :class:`StorageError` naming the URI.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

#: schemes whose first path element is a bucket: one filesystem object per bucket, reused
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


class StorageError(OSError):
    """A read or write on storage failed; the message starts with the URI."""


def is_uri(path: str) -> bool:
    return "://" in str(path)


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """One client per bucket (from_uri resolves the bucket's region, a request, each time)."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    scheme, _, rest = uri.partition("://")
    if scheme in _BUCKET_SCHEMES:
        bucket = rest.split("/", 1)[0]
        with _named(uri):
            return _bucket_filesystem(scheme, bucket), rest.rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:  # a scheme pyarrow has no client for: fsspec's, behind pyarrow's API
        import fsspec

        handler = pafs.FSSpecHandler(fsspec.filesystem(scheme))
        return pafs.PyFileSystem(handler), uri


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)``; local relative paths are made absolute."""
    path = str(path)
    return _from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), os.path.abspath(path))


def absolute(path: str) -> str:
    """``path`` made absolute when local (Ray workers and actors run in other directories)."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (URIs always join with ``/``)."""
    base = str(base)
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def basename(path: str) -> str:
    """The last name of a local path or a URI (``s3://b/run/model/`` -> ``model``)."""
    return posixpath.basename(str(path).rstrip("/")) if is_uri(path) else os.path.basename(path)


@contextlib.contextmanager
def _named(uri: str) -> Iterator[None]:
    """Re-raise a filesystem error with ``uri`` at the front (pyarrow names bucket and key
    apart, or only the endpoint); a missing file stays a FileNotFoundError."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"storage error on {uri}: {exc}") from exc


def _info(path: str) -> pafs.FileInfo:
    fs, p = resolve(path)
    with _named(path):
        return fs.get_file_info(p)


def exists(path: str) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    return _info(path).type == pafs.FileType.Directory


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under ``path`` (recursively) ending in one of ``suffixes``, sorted, as URIs/paths."""
    fs, p = resolve(path)
    with _named(path):
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    found = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes)]
    if is_uri(path) and not is_uri(p):  # pyarrow's own clients drop the scheme
        scheme = str(path).split("://", 1)[0]
        found = [f"{scheme}://{f}" for f in found]
    return sorted(found)


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    with _named(path):
        fs.create_dir(p, recursive=True)


@contextlib.contextmanager
def open_output(path: str) -> Iterator[pa.NativeFile]:
    """A stream whose content appears at ``path`` whole when the block ends without error:
    written under a hidden temporary name, then moved into place (removed on error)."""
    fs, final = resolve(path)
    head, _, tail = final.rpartition("/")
    tmp = f"{head}/.{tail}.{uuid.uuid4().hex[:8]}.tmp"
    with _named(str(path)):
        if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to make
            fs.create_dir(head, recursive=True)
        try:
            with fs.open_output_stream(tmp) as f:
                yield f
            fs.move(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise


class ParquetSink:
    """Stream record batches into one parquet file, published whole on ``close``.

    The schema comes from the first table written, or from ``schema`` when nothing is.
    """

    def __init__(self, path: str, schema: pa.Schema | None = None):
        self.path = str(path)
        self._output = open_output(self.path)
        self._stream = self._output.__enter__()
        self._schema = schema
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        try:
            if self._writer is None:
                self._schema = table.schema
                self._writer = pq.ParquetWriter(self._stream, table.schema)
            with _named(self.path):
                self._writer.write_table(table.cast(self._schema))
        except BaseException as exc:
            self._output.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self.rows += table.num_rows

    def close(self) -> str:
        try:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._stream, self._schema)
            with _named(self.path):
                self._writer.close()
        except BaseException as exc:
            self._output.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._output.__exit__(None, None, None)
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
    with open_output(path) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    """Read a local path or any URI (s3://, gs://, http://, ...) in full."""
    fs, p = resolve(path)
    with _named(str(path)), fs.open_input_stream(p) as f:
        return f.read()


def copy_file(src: str, dest: str) -> None:
    """Copy one file, any filesystem to any other, streamed and published whole at ``dest``."""
    fs, p = resolve(src)
    with _named(str(src)), fs.open_input_stream(p) as f, open_output(dest) as out:
        while chunk := f.read(1 << 24):
            out.write(chunk)


def fingerprint(path: str | None) -> str | None:
    """A hash of the files under ``path`` (names, sizes, modification times): cheap, and
    changed by any rewrite. ``None`` for no input."""
    if path is None:
        return None
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such input: {path}")
    infos = [info]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    items = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def publish_dir(local_dir: str, dest: str, *, manifest: str) -> None:
    """Publish the files of a local folder under ``dest`` (a path or URI) one by one, the
    ``manifest`` file (which names the others) last; nothing is ever moved as a folder.

    Readers of ``dest`` read the manifest and only the files it names, each checked against
    it (the export's digests): a set caught half-published is refused, never mixed.
    """
    local = pafs.LocalFileSystem()
    root = os.path.abspath(local_dir)
    infos = local.get_file_info(pafs.FileSelector(root, recursive=True))
    names = sorted(posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File)
    if manifest not in names:
        raise FileNotFoundError(f"{local_dir} has no {manifest} to publish last")
    for name in [n for n in names if n != manifest] + [manifest]:
        copy_file(f"{root}/{name}", join(dest, name))
