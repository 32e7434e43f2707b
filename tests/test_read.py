"""Readers and validation through Ray Data on a local cluster."""

import io
import json
import tarfile
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from oclear_ray.cli import app
from oclear_ray.contract import CATALOG, QUERIES, SchemaError
from oclear_ray.read import detect_format, prepare, read, validate_source
from tests.conftest import jpeg_bytes, png_bytes

pytestmark = pytest.mark.ray


def write_catalog(path, ids, images, row_group_size=3):
    table = pa.table(
        {
            "doc_id": pa.array(ids, pa.string()),
            "image": pa.array(images, pa.binary()),
            "text": [f"text {i}" for i in range(len(ids))],
            "category": ["a/b"] * len(ids),
            "label": [f"c{i % 4}" for i in range(len(ids))],
            "price": list(range(len(ids))),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return table


def test_bad_rows_quarantined_good_rows_kept(ray_cluster, tmp_path):
    good = [png_bytes(color=(i * 20, 0, 0)) for i in range(12)]
    ids = [f"d{i}" for i in range(12)]
    images = list(good)
    images[2] = b"\x89PNG garbage"  # corrupt
    images[5] = good[5][:40]  # truncated
    ids[7] = None  # missing id
    ids[9] = "d3"  # duplicate of an earlier id, different image
    write_catalog(tmp_path / "c.parquet", ids, images)
    report = validate_source(str(tmp_path / "c.parquet"), workdir=str(tmp_path / "w"))
    assert (report.rows, report.good, report.quarantined) == (12, 8, 4)
    assert report.reasons == {"undecodable image": 2, "missing doc_id": 1, "duplicate doc_id": 1}
    q = pq.read_table(report.quarantine_path)
    assert report.quarantine_path == str(tmp_path / "w" / "quarantine" / "c.parquet")
    rows = {(r["doc_id"], r["price"]): r["reason"] for r in q.to_pylist()}
    assert set(rows) == {("d2", 2), ("d5", 5), (None, 7), ("d3", 9)}
    assert rows[("d3", 9)] == "duplicate doc_id"
    assert q.column("image").to_pylist()[0] == images[2]  # bad rows are kept whole
    assert report.labels == 4


def test_prepare_checks_an_input_once_until_it_changes(ray_cluster, tmp_path, monkeypatch):
    """A repeat on the unchanged input gets the first report and its own copy of the
    quarantine file, with no pass over the rows (no image decoded); a rewritten input is
    checked again."""
    import oclear_ray.read as read_module

    images = [png_bytes(color=(i * 20, 0, 0)) for i in range(6)]
    images[2] = b"\x89PNG garbage"
    path = str(tmp_path / "c.parquet")
    write_catalog(path, [f"d{i}" for i in range(6)], images)
    work = str(tmp_path / "w")
    first = prepare(path, CATALOG, work, quarantine=str(tmp_path / "a.parquet"))
    passes, real = [], read_module.read
    monkeypatch.setattr(read_module, "read", lambda *a, **k: passes.append(1) or real(*a, **k))
    rows = []
    again = prepare(
        path, CATALOG, work, quarantine=str(tmp_path / "b.parquet"), progress=rows.append
    )
    assert passes == [] and rows == [6] and (first.report.rows, first.report.good) == (6, 5)
    assert again.report == replace(first.report, quarantine_path=str(tmp_path / "b.parquet"))
    assert again.rows_path == first.rows_path
    assert pq.read_table(tmp_path / "b.parquet") == pq.read_table(tmp_path / "a.parquet")
    assert sorted(r["doc_id"] for r in again.dataset().take_all()) == ["d0", "d1", "d3", "d4", "d5"]
    write_catalog(path, [f"d{i}" for i in range(5)], images[:5])
    changed = prepare(path, CATALOG, work, quarantine=str(tmp_path / "c2.parquet"))
    assert passes == [1] and changed.report.rows == 5
    assert changed.rows_path != first.rows_path and changed.dataset().count() == 4


def test_missing_doc_id_column_fails_before_work(ray_cluster, tmp_path):
    pq.write_table(pa.table({"id": ["a"], "image": [png_bytes()]}), tmp_path / "x.parquet")
    with pytest.raises(SchemaError, match="missing required column 'doc_id'"):
        read(str(tmp_path / "x.parquet"), CATALOG)


def test_parquet_with_image_paths_and_folder(ray_cluster, tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(color=(i * 50, 9, 9)))
    part = tmp_path / "parts"
    part.mkdir()
    for k in range(2):
        ids = [f"p{k}{i}" for i in range(3)]
        paths = [str(tmp_path / "img" / f"{i}.jpg") for i in range(3)]
        pq.write_table(pa.table({"doc_id": ids, "image_path": paths}), part / f"{k}.parquet")
    assert detect_format(str(part)) == "parquet"
    report = prepare(str(part), CATALOG, str(tmp_path)).report
    assert (report.rows, report.good) == (6, 6)
    rows = read(str(part), CATALOG).take_all()
    assert sorted(r["doc_id"] for r in rows) == ["p00", "p01", "p02", "p10", "p11", "p12"]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_folder(ray_cluster, tmp_path, kind):
    (tmp_path / "images").mkdir()
    records = []
    for i in range(4):
        (tmp_path / "images" / f"{i}.png").write_bytes(png_bytes(color=(0, i * 40, 0)))
        records.append({"doc_id": 100 + i, "file_name": f"images/{i}.png", "text": f"t{i}"})
    records.append({"doc_id": 200, "file_name": "images/missing.png", "text": "gone"})
    if kind == "jsonl":
        (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    else:
        lines = ["doc_id,file_name,text"] + [
            f"{r['doc_id']},{r['file_name']},{r['text']}" for r in records
        ]
        (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    assert detect_format(str(tmp_path)) == "manifest"
    ds = read(str(tmp_path), CATALOG)
    rows = sorted(ds.take_all(), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == ["100", "101", "102", "103", "200"]
    assert rows[0]["image_path"] == str(tmp_path / "images" / "0.png")
    report = prepare(str(tmp_path), CATALOG, str(tmp_path / "w")).report
    assert (report.good, report.quarantined) == (4, 1)
    assert list(report.reasons) == ["unreadable image_path"]


def write_img2dataset_shard(path, n, start=0):
    """A tar shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json per sample."""
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            key = f"{i:09d}"
            meta = {
                "key": key,
                "url": f"http://example.com/{i}.jpg",
                "label": f"c{i % 2}",
                "status": "success",
            }
            files = {
                "jpg": jpeg_bytes(color=(i * 10, 5, 5)),
                "txt": f"caption {i}".encode(),
                "json": json.dumps(meta).encode(),
            }
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_shards(ray_cluster, tmp_path):
    write_img2dataset_shard(tmp_path / "00000.tar", 3)
    write_img2dataset_shard(tmp_path / "00001.tar", 2, start=3)
    assert detect_format(str(tmp_path)) == "webdataset"
    rows = sorted(read(str(tmp_path), CATALOG).take_all(), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == [f"{i:09d}" for i in range(5)]
    assert rows[1]["text"] == "caption 1" and rows[1]["label"] == "c1"
    assert rows[4]["url"] == "http://example.com/4.jpg"
    assert rows[0]["image"][:2] == b"\xff\xd8"
    report = prepare(str(tmp_path / "00000.tar"), CATALOG, str(tmp_path / "w")).report
    assert (report.rows, report.good) == (3, 3)


def test_queries_detected_and_text_only_rows(ray_cluster, tmp_path):
    t = pa.table(
        {
            "query_id": ["q1", "q2", "q3"],
            "image": [png_bytes(), None, None],
            "text": [None, "red mug", None],
            "label": ["a", "b", "c"],
        }
    )
    pq.write_table(t, tmp_path / "queries.parquet")
    report = validate_source(str(tmp_path / "queries.parquet"), workdir=str(tmp_path))
    assert report.kind == "queries"
    assert (report.good, dict(report.reasons)) == (2, {"no image and no text": 1})


def test_cli_validate_exit_codes(ray_cluster, tmp_path):
    write_catalog(tmp_path / "ok.parquet", ["a", "b"], [png_bytes(), png_bytes()])
    pq.write_table(pa.table({"sku": ["a"], "image": [png_bytes()]}), tmp_path / "bad.parquet")
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(tmp_path / "ok.parquet"), "--workdir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "quarantine: " in ok.output
    bad_args = ["validate", str(tmp_path / "bad.parquet"), "--kind", "catalog"]
    bad = runner.invoke(app, [*bad_args, "--workdir", str(tmp_path)])
    assert bad.exit_code == 2
    assert "doc_id" in bad.output


def test_read_checks_contract_of_queries(ray_cluster, tmp_path):
    pq.write_table(pa.table({"query_id": [1], "image": [png_bytes()]}), tmp_path / "q.parquet")
    with pytest.raises(SchemaError, match="'query_id' has type int64"):
        read(str(tmp_path / "q.parquet"), QUERIES)


def test_prepare_keeps_exactly_the_rows_it_judged_good(ray_cluster, tmp_path):
    img = png_bytes()
    ids = ["a", "b", "a", "c", "b", "d"]  # "a" copied exactly; "b" twice with other content
    images = [img, img, img, b"junk", png_bytes(color=(1, 2, 3)), img]
    write_catalog(tmp_path / "c.parquet", ids, images, row_group_size=2)
    prepared = prepare(str(tmp_path / "c.parquet"), CATALOG, str(tmp_path / "w"))
    report = prepared.report
    assert (report.good, report.reasons["duplicate doc_id"]) == (3, 2)
    rows = prepared.dataset().take_all()
    assert sorted((r["doc_id"], r["price"]) for r in rows) == [("a", 0), ("b", 1), ("d", 5)]
    assert "reason" not in rows[0] and "row_hash" not in rows[0]
    assert "fingerprint" not in rows[0]


def test_an_adopted_split_of_clean_rows_is_not_checked_again(ray_cluster, tmp_path, monkeypatch):
    """The probes' training split, written from a clean copy's rows: ``prepare`` of it reads
    the adopted copy (no pass over its rows) with every row good and its labels."""
    import oclear_ray.read as read_module
    from oclear_ray.read import adopt

    path = str(tmp_path / "c.parquet")
    write_catalog(path, [f"d{i}" for i in range(6)], [png_bytes()] * 6)
    rows = prepare(path, CATALOG, str(tmp_path / "w")).table().sort_by("doc_id")  # any order
    split = str(tmp_path / "split.parquet")
    pq.write_table(rows.slice(0, 4), split)
    adopt(split, CATALOG, str(tmp_path / "w"))
    passes, real = [], read_module.read
    monkeypatch.setattr(read_module, "read", lambda *a, **k: passes.append(1) or real(*a, **k))
    again = prepare(split, CATALOG, str(tmp_path / "w"))
    assert passes == [] and (again.report.rows, again.report.good) == (4, 4)
    assert again.report.label_set == {"c0", "c1", "c2", "c3"}
    assert sorted(r["doc_id"] for r in again.dataset().take_all()) == sorted(
        rows.column("doc_id").to_pylist()[:4]
    )
    assert pq.read_table(again.report.quarantine_path).num_rows == 0
