"""The whole flow in one call: govern -> train -> embed -> index -> evaluate.

Governance proposes a class map; ``govern_mode`` says what training does with it: ``apply`` it,
only ``report`` it (train on the raw labels), or ``auto``: apply it only when a short probe
training on it beats one on the raw labels, measured on training-query classes held out for
validation (never on the evaluation queries). ``off`` skips governance.

The same held-out training queries choose, after training, how documents are embedded (fused
with their text or from their image alone) and whether the shape code stays beside the learned
embedding (``choose_views``): the choice and its figures go into the export (``export.revise``),
the stamp, the evaluation report and the served ``/v1/info``. ``views`` says how those queries
are held out: by ``class`` (the default: classes the model never saw as queries, what a new
catalog's queries are), by ``photo`` (a share of every class's photos: users photographing
products training saw, as in the demo), or ``off`` (train on every query, keep the config's
settings).

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
from oclear_ray.classmap import RAW_LABELS
from oclear_ray.config import TrainConfig
from oclear_ray.embed import EmbedConfig
from oclear_ray.evaluate import EvalConfig
from oclear_ray.govern import GovernConfig
from oclear_ray.index import IndexConfig
from oclear_ray.views import VIEW_SPLITS

STAGES = ("govern", "train", "embed", "index", "evaluate")
GOVERN_MODES = ("auto", "apply", "report", "off")


@dataclass(kw_only=True)
class PipelineConfig:
    """Inputs and every stage's config; ``govern=None`` (or ``govern_mode`` "off") trains on
    the raw labels. ``probe_steps`` (at most the run's own steps) and ``probe_share`` (of the
    training queries' classes, held out) size the ``auto`` mode's probes."""

    catalog: str
    workdir: str
    queries: str | None = None
    eval_queries: str | None = None
    #: relevance judgments of ``eval_queries`` (``evaluate.read_judgments``); else by label
    eval_judgments: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    govern: GovernConfig | None = field(default_factory=GovernConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: also measure fused vs image-only document embeddings in the evaluation
    fusion_ablation: bool = False
    govern_mode: str = "auto"
    probe_steps: int = 150
    probe_share: float = 0.2
    #: how the training queries that choose the document view are held out (VIEW_SPLITS)
    views: str = "class"
    #: where the training and evaluation runs are recorded (``tracking.Tracking``); in no
    #: stage's key
    tracking: object | None = None

    def __post_init__(self):
        if self.govern_mode not in GOVERN_MODES:
            raise ValueError(f"govern mode must be one of {GOVERN_MODES}, got {self.govern_mode!r}")
        if self.govern_mode == "off":
            self.govern = None
        if self.eval_judgments and not self.eval_queries:
            raise ValueError("eval_judgments judge the eval queries: give eval_queries too")
        if self.views not in VIEW_SPLITS:
            raise ValueError(f"views must be one of {VIEW_SPLITS}, got {self.views!r}")
        if self.probe_steps < 1 or not 0.0 < self.probe_share < 1.0:
            raise ValueError(
                f"probe_steps must be >= 1 and probe_share in (0, 1), got {self.probe_steps} "
                f"and {self.probe_share}"
            )


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


@dataclass
class _Run:
    """What every stage of one ``run_pipeline`` call shares."""

    cfg: PipelineConfig
    workdir: str  # absolute: Ray's workers and actors run in other directories
    data: dict  # the inputs' fingerprints
    tick: Callable
    log: Callable
    results: dict = field(default_factory=dict)  # {stage: StageResult} so far

    def stage(self, stage: str, inputs: dict, artifact: str, run: Callable[[], dict]):
        self.results[stage] = _run_stage(self.cfg, stage, inputs, artifact, run, self.log)
        return self.results[stage]


def run_pipeline(
    cfg: PipelineConfig, *, log=lambda stage, status, info: None, progress=None
) -> dict:
    """Run the stages in order (skipping current ones); ``{stage: StageResult}``.

    ``log(stage, status, info)`` is told when a stage is skipped, starts and ends;
    ``progress(stage)``, when given, makes the callback a running stage is told its rows done
    by (govern, train, embed, evaluate; index: its shard tasks) and, for train, rank 0's Ray
    Train reports (a dict). Each input is checked once (``read.prepare``), its clean copy in
    WORKDIR/clean read by every stage.
    """
    data = {
        "catalog": storage.fingerprint(cfg.catalog),
        "queries": storage.fingerprint(cfg.queries),
    }
    tick = progress or (lambda stage: None)
    run = _Run(cfg, storage.absolute(cfg.workdir), data, tick, log)
    class_map = _govern_stage(run) if cfg.govern is not None else RAW_LABELS
    _train_stage(run, class_map)
    _embed_stage(run)
    _index_stage(run)
    if cfg.eval_queries is not None:
        _evaluate_stage(run)
    return run.results


def _govern_stage(run: _Run):
    """Governance and the choice of labels; the class map training uses."""
    from oclear_ray.govern import govern

    cfg, w = run.cfg, run.workdir

    def run_govern() -> dict:
        r = govern(
            cfg.catalog, w, config=cfg.govern, queries=cfg.queries, progress=run.tick("govern")
        )
        choice = choose_class_map(cfg, w, r.class_map_path)
        record_choice(w, choice)
        return {"class_map": r.class_map_path, "version": r.version, "choice": choice}

    inputs = {**run.data, "config": _asdict(cfg.govern), "mode": cfg.govern_mode}
    if cfg.govern_mode == "auto":
        probe = {"steps": cfg.probe_steps, "share": cfg.probe_share}
        inputs["probe"] = {**probe, "train": cfg.train.to_dict()}
    path = storage.join(w, "govern", "class_map.json")
    output = run.stage("govern", inputs, path, run_govern).output
    return output["class_map"] if output["choice"]["apply"] else RAW_LABELS


def _train_stage(run: _Run, class_map) -> None:
    from oclear_ray.export import read_manifest
    from oclear_ray.train import fit
    from oclear_ray.views import validation_split

    cfg, w = run.cfg, run.workdir
    governed = run.results.get("govern")
    inputs = {**run.data, "govern": governed and governed.key, "config": cfg.train.to_dict()}
    inputs |= {"views": cfg.views, "share": cfg.probe_share}

    def run_train() -> dict:
        split = None
        if cfg.views != "off":
            split = validation_split(
                cfg.queries, cfg.catalog, w, share=cfg.probe_share, by=cfg.views
            )
        # a run named after its inputs: a rerun with the same inputs resumes its checkpoints,
        # changed inputs start afresh
        r = fit(
            cfg.train,
            catalog=cfg.catalog,
            queries=split.train_path if split else cfg.queries,
            workdir=w,
            class_map=class_map,
            name=f"train-{key_of(inputs)}",
            progress=run.tick("train"),
            on_report=run.tick("train"),
            tracking=cfg.tracking,
            views=split,
        )
        out = {"model_version": read_manifest(r.model_dir)["model_version"], "steps": r.steps}
        return out | ({"views": r.views} if r.views else {})

    run.stage("train", inputs, storage.join(w, "train", "model"), run_train)


def _embed_stage(run: _Run) -> None:
    from oclear_ray.embed import embed_catalog

    cfg, w = run.cfg, run.workdir

    def run_embed() -> dict:
        model_dir = storage.join(w, "train", "model")
        r = embed_catalog(
            cfg.catalog, w, model_dir=model_dir, config=cfg.embed, progress=run.tick("embed")
        )
        return {"version": r.model_version, "embedded": r.embedded}

    key = run.results["train"].key
    inputs = {"catalog": run.data["catalog"], "train": key, "config": _asdict(cfg.embed)}
    run.stage("embed", inputs, storage.join(w, "embed", "embed.json"), run_embed)


def _index_stage(run: _Run) -> None:
    from oclear_ray.index import sync_index

    def run_index() -> dict:
        r = sync_index(run.workdir, run.cfg.index, progress=run.tick("index"))
        return {"version": r.manifest["version"], "action": r.action, "count": r.manifest["count"]}

    inputs = {"embed": run.results["embed"].key, "config": _asdict(run.cfg.index)}
    run.stage("index", inputs, storage.join(run.workdir, "index", "manifest.json"), run_index)


def _evaluate_stage(run: _Run) -> None:
    from oclear_ray.evaluate import evaluate

    cfg = run.cfg

    def run_eval() -> dict:
        report = evaluate(
            run.workdir,
            cfg.eval_queries,
            config=cfg.eval,
            catalog=cfg.catalog,
            image_only_docs=cfg.fusion_ablation,
            tracking=cfg.tracking,
            progress=run.tick("evaluate"),
            judgments=cfg.eval_judgments,
        )
        out = {k: report[k] for k in ("recall@1", "recall@10", "map@r", "n_queries")}
        if "fusion_ablation" in report:
            out["fusion_ablation_recall@1"] = {
                k: report["fusion_ablation"][k]["recall@1"] for k in ("fused", "image_only")
            }
        return out

    inputs = {
        "queries": storage.fingerprint(cfg.eval_queries),
        "judgments": storage.fingerprint(cfg.eval_judgments),
        "index": run.results["index"].key,
        "config": _asdict(cfg.eval),
        "fusion_ablation": cfg.fusion_ablation,
    }
    run.stage("evaluate", inputs, storage.join(run.workdir, "eval", "report.json"), run_eval)


# --------------------------------------------------------------------------- govern mode


def choose_class_map(cfg: PipelineConfig, workdir: str, class_map_path: str) -> dict:
    """Whether training applies the proposed class map, and why (with the figures of ``auto``).

    ``auto`` applies it only when it changes some label (a merge, split, relabel or drop: the
    sampling weights alone are not worth a probe) and the probe trained on it scores a higher
    validation R@1 than the one trained on the raw labels; a tie keeps the raw labels.
    """
    from oclear_ray.classmap import load_class_map

    if cfg.govern_mode != "auto":
        return {"mode": cfg.govern_mode, "apply": cfg.govern_mode == "apply"}
    class_map = load_class_map(class_map_path)
    changes = {k: len(class_map[k]) for k in ("merges", "splits", "relabelled", "dropped")}
    choice = {"mode": "auto", "apply": False, "changes": changes}
    if not any(changes.values()):
        return {**choice, "reason": "the proposed class map changes no label"}
    if cfg.queries is None:
        return {**choice, "reason": "no training queries to validate the class map on"}
    figures = probe(cfg, workdir, class_map)
    if figures is None:
        return {**choice, "reason": "too few training-query classes to hold some out"}
    apply = figures["governed"]["recall@1"] > figures["raw"]["recall@1"]
    reason = "the class map's probe scored higher" if apply else "it did not score higher"
    return {**choice, "apply": apply, "reason": reason, "validation": figures}


def record_choice(workdir: str, choice: dict) -> None:
    """The choice in the governance report (``report.json`` and a line of ``report.md``)."""
    path = storage.join(workdir, "govern", "report.json")
    report = json.loads(storage.read_bytes(path))
    report["choice"] = choice
    storage.write_bytes(path, json.dumps(report, indent=1).encode())
    md = storage.join(workdir, "govern", "report.md")
    line = f"- training: class map {'applied' if choice['apply'] else 'not applied'} "
    line += f"(mode {choice['mode']}{': ' + choice['reason'] if 'reason' in choice else ''})"
    if "validation" in choice:
        v = choice["validation"]
        line += f"; validation R@1 {v['governed']['recall@1']:.3f} with it, "
        line += f"{v['raw']['recall@1']:.3f} with the raw labels ({v['raw']['queries']} queries)"
    storage.write_bytes(md, storage.read_bytes(md) + (line + "\n").encode())


def probe(cfg: PipelineConfig, workdir: str, class_map: dict) -> dict | None:
    """Validation R@1 of two short trainings (``probe_steps``), on the raw labels and on
    ``class_map``, both trained without the held-out classes' queries (``validation_split``);
    a held-out photo finds a document of its class (the class map's classes for both, so that
    both are scored alike) among the whole catalog. None when the split leaves no class on one
    side."""
    from oclear_ray.train import fit
    from oclear_ray.views import validation_recall, validation_split

    split = validation_split(cfg.queries, cfg.catalog, workdir, share=cfg.probe_share, by="class")
    if split is None:
        return None
    probe_dir = storage.join(workdir, "govern", "probe")
    steps = min(cfg.probe_steps, cfg.train.total_steps)
    train = cfg.train.with_total_steps(steps)
    train = dataclasses.replace(train, run=dataclasses.replace(train.run, max_minutes=None))
    out = {}
    for arm, labels_used in (("raw", RAW_LABELS), ("governed", class_map)):
        result = fit(
            train,
            catalog=cfg.catalog,
            queries=split.train_path,
            workdir=storage.join(probe_dir, arm),
            class_map=labels_used,
            name=f"probe-{arm}-{key_of({'map': class_map['version'], 'steps': steps})}",
            cache=storage.join(workdir, "clean"),
        )
        out[arm] = validation_recall(result.model_dir, split.docs, split.val, class_map)
    return out
