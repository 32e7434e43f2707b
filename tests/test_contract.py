"""The data contract without Ray: schema errors name the column, row checks name the reason."""

import pyarrow as pa
import pytest

from oclear_ray.contract import (
    CATALOG,
    QUERIES,
    REASON,
    Limits,
    SchemaError,
    check_rows,
    check_schema,
    conform,
    open_image,
)
from tests.conftest import jpeg_bytes, png_bytes


def catalog(**cols):
    return pa.table(cols)


def test_missing_id_column_is_named():
    with pytest.raises(SchemaError, match="'doc_id'"):
        check_schema(pa.schema([("image", pa.binary()), ("text", pa.string())]), CATALOG)
    with pytest.raises(SchemaError, match="'query_id'"):
        check_schema(pa.schema([("image", pa.binary())]), QUERIES)


def test_catalog_needs_an_image_column():
    with pytest.raises(SchemaError, match="'image'.*'image_path'"):
        check_schema(pa.schema([("doc_id", pa.string()), ("text", pa.string())]), CATALOG)


def test_queries_may_be_text_only_but_not_empty():
    check_schema(pa.schema([("query_id", pa.string()), ("text", pa.string())]), QUERIES)
    with pytest.raises(SchemaError, match="at least one of"):
        check_schema(pa.schema([("query_id", pa.string()), ("label", pa.string())]), QUERIES)


def test_wrong_type_is_named():
    schema = pa.schema([("doc_id", pa.int64()), ("image", pa.binary())])
    with pytest.raises(SchemaError, match="column 'doc_id' has type int64, expected string"):
        check_schema(schema, CATALOG)
    schema = pa.schema([("doc_id", pa.string()), ("image", pa.string())])
    with pytest.raises(SchemaError, match="column 'image' has type string"):
        check_schema(schema, CATALOG)


def test_label_required_for_training():
    schema = pa.schema([("query_id", pa.string()), ("image", pa.binary())])
    with pytest.raises(SchemaError, match="'label'"):
        check_schema(schema, QUERIES, require_label=True)


def test_conform_fills_casts_and_keeps_extras():
    t = pa.table(
        {
            "price": [1.5, 2.0],
            "doc_id": pa.array(["a", "b"], pa.large_string()),
            "image": pa.array([b"x", b"y"], pa.large_binary()),
        }
    )
    out = conform(t, CATALOG)
    assert out.column_names == [*CATALOG.names, "price"]
    assert out.schema.field("doc_id").type == pa.string()
    assert out.column("text").null_count == 2
    assert out.column("price").to_pylist() == [1.5, 2.0]


def test_check_rows_reasons():
    good = png_bytes()
    truncated = good[: len(good) // 2]
    t = catalog(
        doc_id=["ok", None, "bad", "empty", "trunc", "big", "jpg", " "],
        image=[
            good,
            good,
            b"not an image",
            b"",
            truncated,
            png_bytes(size=(100, 100)),
            jpeg_bytes(),
            good,
        ],
    )
    out = check_rows(t, CATALOG, Limits(max_pixels=5000))
    reasons = out.column(REASON).to_pylist()
    assert reasons[0] is None and reasons[6] is None
    assert reasons[1] == "missing doc_id" and reasons[7] == "missing doc_id"
    assert reasons[2].startswith("undecodable image")
    assert reasons[3] == "empty image"
    assert reasons[4].startswith("undecodable image")
    assert reasons[5] == "image over pixel limit (100x100 > 5000 pixels)"


def test_check_rows_reads_image_path(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(png_bytes())
    t = catalog(doc_id=["a", "b"], image_path=[str(p), str(tmp_path / "missing.png")])
    out = check_rows(t, CATALOG, Limits())
    assert out.column("image").to_pylist()[0] == p.read_bytes()
    reasons = out.column(REASON).to_pylist()
    assert reasons[0] is None
    assert reasons[1].startswith("unreadable image_path: FileNotFoundError")


def test_query_rows_text_only_ok_nothing_bad():
    t = pa.table({"query_id": ["t", "n"], "text": ["red mug", None]})
    reasons = check_rows(t, QUERIES, Limits()).column(REASON).to_pylist()
    assert reasons == [None, "no image and no text"]


def test_open_image_refuses_before_decoding():
    with pytest.raises(ValueError, match="pixel limit"):
        open_image(png_bytes(size=(300, 300)), Limits(max_pixels=1000))
    with pytest.raises(ValueError, match="byte limit"):
        open_image(png_bytes(), Limits(max_bytes=10))
    assert open_image(png_bytes(mode="RGBA", color=(1, 2, 3, 0)), Limits()).mode == "RGBA"


def test_limits_validated():
    with pytest.raises(ValueError, match="max_pixels must be positive, got 0"):
        Limits(max_pixels=0)
