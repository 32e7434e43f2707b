"""The pipeline's skip logic without Ray: input fingerprints and stage stamps."""

import os

import pytest

from oclear_ray.pipeline import PipelineConfig, _run_stage, key_of, read_stamp
from oclear_ray.storage import fingerprint


def test_fingerprint_follows_file_changes(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"one")
    first = fingerprint(str(folder))
    assert fingerprint(str(folder)) == first
    (folder / "b.parquet").write_bytes(b"two")
    second = fingerprint(str(folder))
    assert second != first
    os.utime(folder / "a.parquet", ns=(1, 1))
    assert fingerprint(str(folder)) not in (first, second)
    assert fingerprint(None) is None
    with pytest.raises(FileNotFoundError, match="no such input"):
        fingerprint(str(tmp_path / "missing.parquet"))


def test_key_ignores_dict_order():
    assert key_of({"a": 1, "b": [1, 2]}) == key_of({"b": [1, 2], "a": 1})
    assert key_of({"a": 1}) != key_of({"a": 2})


def test_a_stage_runs_once_per_inputs_and_again_when_its_artifact_is_gone(tmp_path):
    cfg = PipelineConfig(catalog="unused", workdir=str(tmp_path))
    artifact = tmp_path / "out.txt"
    calls, seen = [], []

    def run():
        calls.append(1)
        artifact.write_text("made")
        return {"made": len(calls)}

    def log(stage, status, info):
        seen.append(status)

    first = _run_stage(cfg, "stage", {"x": 1}, str(artifact), run, log)
    again = _run_stage(cfg, "stage", {"x": 1}, str(artifact), run, log)
    assert (first.status, again.status, len(calls)) == ("ran", "current", 1)
    assert again.output == {"made": 1} and again.key == first.key
    assert read_stamp(str(tmp_path), "stage")["inputs"] == {"x": 1}
    changed = _run_stage(cfg, "stage", {"x": 2}, str(artifact), run, log)
    assert (changed.status, changed.output) == ("ran", {"made": 2})
    artifact.unlink()
    gone = _run_stage(cfg, "stage", {"x": 2}, str(artifact), run, log)
    assert (gone.status, len(calls)) == ("ran", 3)
    assert seen == ["running", "done", "current", "running", "done", "running", "done"]


def _class_map(tmp_path, changed: bool) -> str:
    """A saved class map over labels a, b: with one relabel when ``changed``."""
    import json

    from oclear_ray.classmap import content_version, raw_class_map

    body = {k: v for k, v in raw_class_map(["a", "b"]).items() if k != "version"}
    if changed:
        body["relabelled"] = {"d1": {"from": "a", "to": 1, "confidence": 0.9}}
        body["doc_class"] = {"d1": 1}
    path = tmp_path / f"map-{changed}.json"
    path.write_text(json.dumps({"version": content_version(body), **body}))
    return str(path)


def test_govern_modes_decide_without_a_probe_where_nothing_is_to_measure(tmp_path):
    from oclear_ray.pipeline import choose_class_map

    changed, unchanged = _class_map(tmp_path, True), _class_map(tmp_path, False)
    for mode, apply in (("apply", True), ("report", False)):
        cfg = PipelineConfig(catalog="c", workdir=str(tmp_path), govern_mode=mode)
        assert choose_class_map(cfg, str(tmp_path), changed) == {"mode": mode, "apply": apply}
    auto = PipelineConfig(catalog="c", workdir=str(tmp_path))
    assert auto.govern_mode == "auto"
    nothing = choose_class_map(auto, str(tmp_path), unchanged)
    assert (
        nothing["apply"] is False and nothing["reason"] == "the proposed class map changes no label"
    )
    no_queries = choose_class_map(auto, str(tmp_path), changed)
    assert no_queries["apply"] is False and no_queries["changes"]["relabelled"] == 1
    assert no_queries["reason"] == "no training queries to validate the class map on"
    assert PipelineConfig(catalog="c", workdir="w", govern_mode="off").govern is None
    with pytest.raises(ValueError, match="govern mode must be one of .* got 'sometimes'"):
        PipelineConfig(catalog="c", workdir="w", govern_mode="sometimes")
    with pytest.raises(ValueError, match="eval_judgments judge the eval queries"):
        PipelineConfig(catalog="c", workdir="w", eval_judgments="j.json")
