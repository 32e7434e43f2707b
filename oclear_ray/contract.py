"""The data contract: the schemas every reader produces and every job consumes, and row checks.

A schema problem (missing id column, no image column, wrong type) is a ``SchemaError`` that names
the column, raised before any work starts. A bad row (missing or duplicate id, empty or
undecodable image, image over the pixel limit) never crashes a job: ``check_rows`` gives it a
``reason`` and the stage sends it to a quarantine table.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from oclear_ray.storage import read_bytes

REASON = "reason"
FINGERPRINT = "fingerprint"
#: a reader's stable identity of a row (source file and position), dropped after cleaning
ROW_HASH = "row_hash"


@dataclass(frozen=True, kw_only=True)
class Contract:
    """One kind of table (catalog or queries): its id column and its contract columns."""

    kind: str
    id_column: str
    schema: pa.Schema
    needs_image: bool

    @property
    def names(self) -> list[str]:
        return self.schema.names


#: the type of every column a contract names
COLUMN_TYPES = {
    "doc_id": pa.string(),
    "query_id": pa.string(),
    "image": pa.binary(),
    "image_path": pa.string(),
    "text": pa.string(),
    "category": pa.string(),
    "label": pa.string(),
}


def columns(*names: str, **more: pa.DataType) -> pa.Schema:
    """The schema of the contract columns ``names`` (their contract types), then ``more``."""
    return pa.schema([(name, COLUMN_TYPES[name]) for name in names] + list(more.items()))


CATALOG = Contract(
    kind="catalog",
    id_column="doc_id",
    schema=columns("doc_id", "image", "image_path", "text", "category", "label"),
    needs_image=True,
)

QUERIES = Contract(
    kind="queries",
    id_column="query_id",
    schema=columns("query_id", "image", "image_path", "text", "label"),
    needs_image=False,
)

CONTRACTS = {c.kind: c for c in (CATALOG, QUERIES)}


class SchemaError(ValueError):
    """A table does not follow the data contract; the message names the column."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Row-level limits: images larger than this are quarantined, not decoded."""

    max_pixels: int = 40_000_000
    max_bytes: int = 50_000_000

    def __post_init__(self):
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if pa.types.is_null(actual):
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_binary(expected):
        return pa.types.is_binary(actual) or pa.types.is_large_binary(actual)
    return actual == expected


def check_schema(schema: pa.Schema, contract: Contract, *, require_label: bool = False) -> None:
    """Raise ``SchemaError`` naming the first column that breaks the contract."""
    present = set(schema.names)
    what = contract.kind
    if contract.id_column not in present:
        raise SchemaError(
            f"{what} is missing required column '{contract.id_column}' "
            f"(columns: {', '.join(schema.names) or 'none'})"
        )
    if contract.needs_image and not present & {"image", "image_path"}:
        raise SchemaError(f"{what} needs an 'image' (bytes) or 'image_path' (string) column")
    if not contract.needs_image and not present & {"image", "image_path", "text"}:
        raise SchemaError(f"{what} needs at least one of 'image', 'image_path' or 'text'")
    if require_label and "label" not in present:
        raise SchemaError(f"{what} is missing column 'label', needed for training and evaluation")
    for field in contract.schema:
        if field.name in present:
            actual = schema.field(field.name).type
            if not _compatible(actual, field.type):
                raise SchemaError(
                    f"{what} column '{field.name}' has type {actual}, expected {field.type}"
                )


def conform(table: pa.Table, contract: Contract) -> pa.Table:
    """Cast contract columns to their types, add missing ones as nulls, keep extras after them."""
    check_schema(table.schema, contract)
    columns, fields = [], []
    for field in contract.schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
        fields.append(field)
    for name in table.column_names:
        if name not in contract.names and name not in (REASON, FINGERPRINT):
            columns.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode image bytes fully, refusing oversized images before decoding them.

    Raises ``ValueError`` with the reason: empty, over the byte or pixel limit, undecodable.
    """
    if not data:
        raise ValueError("empty image")
    if len(data) > limits.max_bytes:
        raise ValueError(f"image over byte limit ({len(data)} > {limits.max_bytes} bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except Exception as exc:  # PIL raises many types for bad input
        raise ValueError(f"undecodable image: {type(exc).__name__}: {exc}") from exc
    if width * height > limits.max_pixels:
        raise ValueError(f"image over pixel limit ({width}x{height} > {limits.max_pixels} pixels)")
    try:
        img.load()
    except Exception as exc:
        raise ValueError(f"undecodable image: {type(exc).__name__}: {exc}") from exc
    return img


def _row_reason(row_id, image, image_path, text, contract, limits):
    """Return ``(reason or None, image bytes or None)`` for one row."""
    if row_id is None or not str(row_id).strip():
        return f"missing {contract.id_column}", image
    if image is None and image_path:
        try:
            image = read_bytes(image_path)
        except Exception as exc:  # fsspec and the filesystems it wraps raise many types
            return f"unreadable image_path: {type(exc).__name__}: {exc}", None
    if image is None and image_path is None:
        if contract.needs_image:
            return "no image", None
        return (None, None) if text else ("no image and no text", None)
    try:
        open_image(image, limits)
    except ValueError as exc:
        return str(exc), image
    return None, image


def row_fingerprint(row_id, image, text, row_hash=None) -> str:
    """A short hash telling two rows with one id apart: their source position when the reader
    gave one (``row_hash``), else their content."""
    h = hashlib.sha1(str(row_id).encode())
    if row_hash is not None:
        h.update(str(row_hash).encode())
    else:
        h.update(image or b"")
        h.update((text or "").encode())
    return h.hexdigest()[:16]


def check_rows(table: pa.Table, contract: Contract, limits: Limits) -> pa.Table:
    """Conform a batch and add ``reason`` (null when the row is good) and ``fingerprint``.

    Images given by ``image_path`` are read into ``image`` so later stages read them once.
    Duplicate ids are found across batches by the caller, not here.
    """
    table = conform(table, contract)
    ids = table.column(contract.id_column).to_pylist()
    images = table.column("image").to_pylist()
    paths = table.column("image_path").to_pylist()
    texts = table.column("text").to_pylist()
    reasons, resolved = [], []
    for row_id, image, path, text in zip(ids, images, paths, texts, strict=True):
        reason, data = _row_reason(row_id, image, path, text, contract, limits)
        reasons.append(reason)
        resolved.append(data)
    rows = table.column(ROW_HASH).to_pylist() if ROW_HASH in table.column_names else None
    rows = rows or [None] * table.num_rows
    prints = [
        row_fingerprint(i, b, t, r) for i, b, t, r in zip(ids, resolved, texts, rows, strict=True)
    ]
    index = table.schema.get_field_index("image")
    table = table.set_column(index, "image", pa.array(resolved, pa.binary()))
    table = table.append_column(REASON, pa.array(reasons, pa.string()))
    return table.append_column(FINGERPRINT, pa.array(prints, pa.string()))


def good_mask(table: pa.Table) -> pa.Array:
    """Boolean mask of rows without a reason."""
    return pc.is_null(table.column(REASON))
