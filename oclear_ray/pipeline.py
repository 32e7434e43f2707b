"""The whole flow in one call: govern -> train -> embed -> index -> evaluate.

Each stage writes ``WORKDIR/<stage>/stamp.json``: a key over what it was made from (input
fingerprints, the upstream artifact's version, its config) and the version of what it made. A
stage whose key matches its stamp, and whose artifact is still there, is skipped; a changed
input reruns that stage and, through the versions, everything after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from oclear_ray import storage
from oclear_ray.config import TrainConfig
from oclear_ray.embed import EmbedConfig
from oclear_ray.evaluate import EvalConfig
from oclear_ray.govern import RAW_LABELS, GovernConfig
from oclear_ray.index import IndexConfig

STAGES = ("govern", "train", "embed", "index", "evaluate")


@dataclass(kw_only=True)
class PipelineConfig:
    """Inputs and every stage's config; ``govern=None`` trains on the raw labels."""

    catalog: str
    workdir: str
    queries: str | None = None
    eval_queries: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    govern: GovernConfig | None = field(default_factory=GovernConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: also measure fused vs image-only document embeddings in the evaluation
    fusion_ablation: bool = False


def fingerprint(path: str | None) -> str | None:
    """A hash of the files under ``path`` (names, sizes, modification times): cheap, and
    changed by any rewrite. ``None`` for no input."""
    if path is None:
        return None
    import pyarrow.fs as pafs

    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such input: {path}")
    infos = [info]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    items = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stamp_path(workdir: str, stage: str) -> str:
    return storage.join(workdir, stage, "stamp.json")


def read_stamp(workdir: str, stage: str) -> dict | None:
    path = _stamp_path(workdir, stage)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def write_stamp(workdir: str, stage: str, key: str, inputs: dict, output: dict) -> None:
    stamp = {"key": key, "inputs": inputs, "output": output, "time": time.time()}
    storage.write_bytes(_stamp_path(workdir, stage), json.dumps(stamp, indent=2).encode())


def _asdict(obj) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" or "current"
    seconds: float
    key: str  # of its inputs: the next stage's inputs include it
    output: dict


def _run_stage(
    cfg: PipelineConfig, stage: str, inputs: dict, artifact: str, run: Callable[[], dict], log
) -> StageResult:
    """Run ``run`` unless the stamp says its output, made from ``inputs``, is current."""
    key, stamp = key_of(inputs), read_stamp(cfg.workdir, stage)
    if stamp and stamp["key"] == key and storage.exists(artifact):
        log(stage, "current", stamp["output"])
        return StageResult(stage, "current", 0.0, key, stamp["output"])
    log(stage, "running", {})
    start = time.perf_counter()
    output = run()
    write_stamp(cfg.workdir, stage, key, inputs, output)
    result = StageResult(stage, "ran", round(time.perf_counter() - start, 1), key, output)
    log(stage, "done", {**output, "seconds": result.seconds})
    return result


def run_pipeline(cfg: PipelineConfig, *, log=lambda stage, status, info: None) -> dict:
    """Run the stages in order (skipping current ones); ``{stage: StageResult}``.

    ``log(stage, status, info)`` is told when a stage is skipped, starts and ends.
    """
    from oclear_ray.embed import embed_catalog
    from oclear_ray.evaluate import evaluate
    from oclear_ray.export import read_manifest
    from oclear_ray.govern import govern
    from oclear_ray.index import sync_index
    from oclear_ray.train import fit

    w = storage.absolute(cfg.workdir)  # Ray's workers and actors run in other directories
    data = {"catalog": fingerprint(cfg.catalog), "queries": fingerprint(cfg.queries)}
    results = {}

    class_map = RAW_LABELS
    if cfg.govern is not None:
        path = storage.join(w, "govern", "class_map.json")

        def run_govern() -> dict:
            r = govern(cfg.catalog, w, config=cfg.govern, queries=cfg.queries)
            return {"class_map": r.class_map_path, "version": r.version}

        inputs = {**data, "config": _asdict(cfg.govern)}
        results["govern"] = _run_stage(cfg, "govern", inputs, path, run_govern, log)
        class_map = results["govern"].output["class_map"]
    train_inputs = {
        **data,
        "govern": results["govern"].key if cfg.govern is not None else None,
        "config": cfg.train.to_dict(),
    }
    model_dir = storage.join(w, "train", "model")

    def run_train() -> dict:
        # a run named after its inputs: a rerun with the same inputs resumes its checkpoints,
        # changed inputs start afresh
        r = fit(
            cfg.train,
            catalog=cfg.catalog,
            queries=cfg.queries,
            workdir=w,
            class_map=class_map,
            name=f"train-{key_of(train_inputs)}",
        )
        return {"model_version": read_manifest(r.model_dir)["model_version"], "steps": r.steps}

    results["train"] = _run_stage(cfg, "train", train_inputs, model_dir, run_train, log)

    def run_embed() -> dict:
        r = embed_catalog(cfg.catalog, w, model_dir=model_dir, config=cfg.embed)
        return {"version": r.model_version, "embedded": r.embedded}

    inputs = {
        "catalog": data["catalog"],
        "train": results["train"].key,
        "config": _asdict(cfg.embed),
    }
    embed_summary = storage.join(w, "embed", "embed.json")
    results["embed"] = _run_stage(cfg, "embed", inputs, embed_summary, run_embed, log)

    def run_index() -> dict:
        r = sync_index(w, cfg.index)
        return {"version": r.manifest["version"], "action": r.action, "count": r.manifest["count"]}

    inputs = {"embed": results["embed"].key, "config": _asdict(cfg.index)}
    manifest = storage.join(w, "index", "manifest.json")
    results["index"] = _run_stage(cfg, "index", inputs, manifest, run_index, log)

    if cfg.eval_queries is not None:

        def run_eval() -> dict:
            report = evaluate(
                w,
                cfg.eval_queries,
                config=cfg.eval,
                catalog=cfg.catalog,
                image_only_docs=cfg.fusion_ablation,
            )
            out = {k: report[k] for k in ("recall@1", "recall@10", "map@r", "n_queries")}
            if "fusion_ablation" in report:
                out["fusion_ablation_recall@1"] = {
                    k: report["fusion_ablation"][k]["recall@1"] for k in ("fused", "image_only")
                }
            return out

        inputs = {
            "queries": fingerprint(cfg.eval_queries),
            "index": results["index"].key,
            "config": _asdict(cfg.eval),
            "fusion_ablation": cfg.fusion_ablation,
        }
        report = storage.join(w, "eval", "report.json")
        results["evaluate"] = _run_stage(cfg, "evaluate", inputs, report, run_eval, log)
    return results
