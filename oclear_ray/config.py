"""The training configuration: a tree of sections (keyword-only dataclasses), loaded from YAML.

One file chooses the backbone, dims, margin, sampling rate, batch size, workers, CPU/GPU,
precision and the stage schedule. Every section checks itself in ``__post_init__`` with an error
that names the bad value; unknown keys are errors too.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field

import yaml

from oclear_ray.preprocess import PreprocessConfig

MARGINS = ("cosface", "arcface")
DEFAULT_M = {"cosface": 0.2, "arcface": 0.5}  # the CPU recipe's CosFace m; ArcFace's paper value
DOC_QUERY_VIEWS = ("photo", "outline", "render")
#: the level maps of an image the shape code (``ShapeConfig.levels``) and the backbone
#: (``ImageEncoderConfig.levels``) can read
SHAPE_LEVELS = ("grey", "ink")


#: timm's prefixes for backbones named by where their weights are, not by architecture
WEIGHT_SOURCES = ("hf-hub:", "local-dir:")


def section(cls):
    """A config section: a keyword-only dataclass in which a field typed as another section,
    given no default, defaults to that section's defaults (``image: ImageEncoderConfig`` is
    ``field(default_factory=ImageEncoderConfig)``)."""
    hints = typing.get_type_hints(cls)
    for name in inspect.get_annotations(cls):
        if dataclasses.is_dataclass(hints[name]) and name not in vars(cls):
            setattr(cls, name, field(default_factory=hints[name]))
    return dataclass(kw_only=True)(cls)


@section
class ImageEncoderConfig:
    """A timm backbone: random init, timm's pretrained weights, or a local weights file.

    ``pretrained``: false (random init); true (timm's weights for ``name``, which may carry a
    tag: ``convnext_atto.d2_in1k``); or the model to create with its weights in place of
    ``name``: a timm name with its tag, an ``hf-hub:org/repo`` id, or a ``local-dir:/path``
    folder as ``timm.models.save_for_hf`` writes it. timm downloads hub weights into the
    Hugging Face cache. ``pretrained_path``: a safetensors or torch weights file for ``name``,
    loaded by timm (its classifier is dropped).
    """

    name: str = "resnet10t"
    pretrained: bool | str = False
    pretrained_path: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    #: what the backbone sees (``model.LevelView``): the colour image ("rgb") or one level map
    #: on its three channels, "grey" (luma) or "ink" (the brightest channel), as the shape code
    #: reads them. Grey was chosen for the CPU default on class-split validation queries of
    #: both development sets (bench/README.md: the learned part alone at 300 steps, R@1 on
    #: openmoji-dev 0.646 rgb / 0.755 grey / 0.820 ink, on logos-dev 0.089 / 0.253 / 0.120);
    #: pretrained photo backbones and catalogs told apart by colour keep "rgb"
    levels: str = "grey"

    def __post_init__(self) -> None:
        if self.levels not in ("rgb", *SHAPE_LEVELS):
            raise ValueError(
                f"model.image.levels must be one of {('rgb', *SHAPE_LEVELS)}, got {self.levels!r}"
            )
        if not isinstance(self.pretrained, bool | str) or self.pretrained == "":
            raise ValueError(
                "image.pretrained must be true, false or a timm model name / hf-hub: / "
                f"local-dir: id, got {self.pretrained!r}"
            )
        if self.pretrained and self.pretrained_path:
            raise ValueError("image.pretrained and image.pretrained_path exclude each other")
        import timm  # only to check the name: parsing a config builds no model

        model = self.model_id
        if not model.startswith(WEIGHT_SOURCES) and not timm.is_model(model):
            raise ValueError(f"unknown timm model name {model!r}")

    @property
    def model_id(self) -> str:
        """What ``timm.create_model`` is given."""
        return self.pretrained if isinstance(self.pretrained, str) else self.name

    @property
    def has_weights(self) -> bool:
        return bool(self.pretrained or self.pretrained_path)


@section
class TextEncoderConfig:
    """A BERT-style text tower built from sizes, a full transformers config, or a local folder.

    Precedence: ``pretrained_path`` (a ``save_pretrained`` folder), then ``hf_config`` (a
    transformers config dict, as written by export), then the size fields (random init).
    """

    vocab_size: int = 4000
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 64
    dropout: float = 0.1
    pretrained_path: str | None = None
    hf_config: dict | None = None
    where: typing.ClassVar[str] = "text"  # how errors name the section

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.where}.{name} must be >= 1, got {getattr(self, name)}")
        _check_attention(self, "hidden_size")


@section
class FusionConfig:
    """Concept slots reading the text, then the image; plus the per-document modality gate."""

    num_concepts: int = 8
    dim: int = 128
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    where: typing.ClassVar[str] = "fusion"

    def __post_init__(self) -> None:
        if self.num_concepts < 1:
            raise ValueError(f"{self.where}.num_concepts must be >= 1, got {self.num_concepts}")
        _check_attention(self, "dim")
        if self.mlp_ratio <= 0:
            raise ValueError(f"{self.where}.mlp_ratio must be > 0, got {self.mlp_ratio}")


def _check_attention(section, width: str) -> None:
    """The checks of an attention block's sizes (the text tower's, the fusion's): its width
    (the field ``width``) a positive multiple of ``num_heads``, ``dropout`` in [0, 1)."""
    where, size, heads = section.where, getattr(section, width), section.num_heads
    if size < 1 or heads < 1 or size % heads:
        raise ValueError(
            f"{where}.{width} {size} must be a positive multiple of {where}.num_heads {heads}"
        )
    if not 0.0 <= section.dropout < 1.0:
        raise ValueError(f"{where}.dropout must be in [0, 1), got {section.dropout}")


@section
class ShapeConfig:
    """The coarse shape code kept beside the learned embedding (``model.ShapeCode``): the
    lowest ``size`` x ``size`` 2-D DCT frequencies of the image's ``levels``, weighted by
    ``weight`` against the learned part (0 or size 0 turn it off). It is what pixel k-NN
    matches, and a learned embedding trained on few renderings loses it on renderings it never
    saw. ``levels`` is "grey" (luma: every mark counts) or "ink" (the darkness of the brightest
    channel: black ink counts, coloured fills read as paper, so a colour drawing and its line
    art share a code). Size 24 was chosen on the training queries of both development sets
    (pixel k-NN there: 16 / 24 / 32 give 0.779 / 0.797 / 0.800 on openmoji-dev, 0.453 / 0.457 /
    0.459 on logos-dev), weight 2 on class-split validation queries at size 16 (``bench/recipe.py
    --shape-weights``); a pipeline chooses the levels and the weight (or no code) on its own
    validation split (``views.choose_views``); pretrained photo backbones turn it off
    (``configs/gpu.yaml``)."""

    size: int = 24
    weight: float = 2.0
    levels: str = "grey"

    def __post_init__(self) -> None:
        if self.size < 0 or self.size == 1:
            raise ValueError(f"model.shape.size must be 0 (off) or >= 2, got {self.size}")
        if self.weight < 0:
            raise ValueError(f"model.shape.weight must be >= 0, got {self.weight}")
        if self.levels not in SHAPE_LEVELS:
            raise ValueError(
                f"model.shape.levels must be one of {SHAPE_LEVELS}, got {self.levels!r}"
            )

    @property
    def dim(self) -> int:
        """Its width in the embedding (the constant term is left out): 0 when off."""
        return self.size * self.size - 1 if self.size and self.weight else 0


@section
class ModelConfig:
    """The whole model: encoders, fusion, embedding size, and the preprocessing it expects."""

    image: ImageEncoderConfig
    text: TextEncoderConfig
    fusion: FusionConfig
    preprocess: PreprocessConfig
    shape: ShapeConfig
    #: the learned embedding's width (what the classifier trains)
    embed_dim: int = 128

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.shape.size > self.preprocess.image_size:
            raise ValueError(
                f"model.shape.size {self.shape.size} exceeds preprocess.image_size "
                f"{self.preprocess.image_size}: set model.shape.size <= "
                f"{self.preprocess.image_size}, or 0 to leave the shape code out"
            )
        built_from_sizes = self.text.pretrained_path is None and self.text.hf_config is None
        if built_from_sizes and self.preprocess.max_text_length > self.text.max_position_embeddings:
            raise ValueError(
                f"preprocess.max_text_length {self.preprocess.max_text_length} exceeds "
                f"text.max_position_embeddings {self.text.max_position_embeddings}"
            )

    @property
    def output_dim(self) -> int:
        """The width of the vectors the encoders return and the index holds."""
        return self.embed_dim + self.shape.dim

    def to_dict(self) -> dict:
        """Plain JSON-ready nested dict (the inverse of :meth:`from_dict`)."""
        return {**dataclasses.asdict(self), "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from nested plain dicts (JSON/YAML, an export's manifest), each value read as
        its field's type; unknown keys and wrong types are errors naming them."""
        return _build(cls, _read(cls, data or {}, "model"))


@section
class MarginConfig:
    """The margin softmax (``oclear_ray.classifier``): CosFace ``cos - m`` or ArcFace
    ``cos(theta + m)`` on the positive logit, logits times ``scale``; ``m=None`` takes the
    margin's ``DEFAULT_M``. ``sample_rate`` is the share of each rank's centres used per step
    (Partial FC; the batch's positives are always kept); 1.0 uses every centre."""

    margin: str = "cosface"
    m: float | None = None
    scale: float = 32.0
    sample_rate: float = 1.0
    where: typing.ClassVar[str] = "head"  # how errors name the section

    def __post_init__(self):
        if self.margin not in MARGINS:
            raise ValueError(f"{self.where}.margin must be one of {MARGINS}, got {self.margin!r}")
        if self.m is None:
            self.m = DEFAULT_M[self.margin]
        top = math.pi / 2 if self.margin == "arcface" else 1.0
        if not 0.0 <= self.m < top:
            raise ValueError(
                f"{self.where}.m must be in [0, {top:g}) for {self.margin}, got {self.m!r}"
            )
        if not self.scale > 0:
            raise ValueError(f"{self.where}.scale must be > 0, got {self.scale!r}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(
                f"{self.where}.sample_rate must be in (0, 1], got {self.sample_rate!r}"
            )


@section
class HeadConfig(MarginConfig):
    """The sharded margin-softmax classifier of a training run (its class count comes from
    the class map) and how the fuse stage weighs its text rows."""

    #: None: one softmax over every row of a fuse step (image-only documents, query photos, fused
    #: documents, text queries). A number w: the image rows' loss plus w times the text rows' loss,
    #: so adding the text rows does not dilute the query photos' share of the gradient
    text_weight: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.text_weight is not None and self.text_weight < 0:
            raise ValueError(f"head.text_weight must be >= 0 or null, got {self.text_weight}")


@section
class DataConfig:
    """Per-worker batch sizes and the augmentation of training views."""

    batch_size: int = 64
    query_batch_size: int = 32
    #: per-epoch views: a mild crop of documents, photo-like views of queries (off by default:
    #: on openmoji-dev it did not pay within a CPU budget)
    augment: bool = False
    #: how strong those views are (torchvision ranges and probabilities scaled; 1 the default)
    augment_strength: float = 1.0
    #: keep decoded images in the Ray object store between epochs (turn off for catalogs
    #: larger than the object store: they then stream from storage every epoch)
    cache: bool = True
    #: also train the query tower on views of document images (for classes that have documents
    #: but no query): ``doc_query_view`` "photo" (a user's photo of the item), "outline" (its ink,
    #: coloured fills as paper: a line drawing) or "render" (as another source may draw it:
    #: moved and scaled, then re-inked, knocked out of a tile, grey, line art or edges). The CPU
    #: default, half the documents as outlines, was chosen with resnet10t on class-split
    #: validation queries (bench/README.md, session 13)
    doc_as_query_rate: float = 0.5
    doc_query_view: str = "outline"
    #: at most this many Ray Data tasks drawing views at once (0: one per training worker).
    #: Each is a process that imports torch: on a few cores, more of them start up slower than
    #: they work (2-core demo: 6 at once held the first batch 38 s and the steps at 290
    #: samples/s; 2 at once, 23 s and 417)
    view_tasks: int = 0

    def __post_init__(self):
        if self.doc_query_view not in DOC_QUERY_VIEWS:
            raise ValueError(
                f"data.doc_query_view must be one of {DOC_QUERY_VIEWS}, got {self.doc_query_view!r}"
            )
        if self.view_tasks < 0:
            raise ValueError(f"data.view_tasks must be >= 0, got {self.view_tasks}")
        for name in ("batch_size", "query_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.augment_strength <= 2.0:
            raise ValueError(
                f"data.augment_strength must be in [0, 2], got {self.augment_strength}"
            )
        if not 0.0 <= self.doc_as_query_rate <= 1.0:
            raise ValueError(
                f"data.doc_as_query_rate must be in [0, 1], got {self.doc_as_query_rate}"
            )


@section
class OptimConfig:
    """AdamW for the encoders and for the classifier shard (no decay on centres); cosine decay."""

    lr: float = 2e-3
    head_lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20

    def __post_init__(self):
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError(
                f"optim.lr and optim.head_lr must be > 0, got {self.lr}, {self.head_lr}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


TOWERS = ("image", "all")


@section
class StageConfig:
    """A stage of the schedule: ``image`` aligns query and document images (image towers only),
    ``all`` trains the fusion too."""

    name: str
    steps: int
    towers: str = "all"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.towers not in TOWERS:
            raise ValueError(
                f"stage {self.name!r}: towers must be one of {TOWERS}, got {self.towers!r}"
            )


PRECISIONS = ("fp32", "bf16")
SCHEDULE_BY = ("steps", "time")


@section
class RunConfig:
    """Workers and resources, precision, checkpoints, failures and the wall-time budget.

    fsdp: with several workers, true shards the encoders with FSDP2 (each block, then the
    root: what a model too big to replicate needs); false replicates them with DDP (gradients
    averaged in bucketed all-reduces). Either way the classifier stays sharded.
    schedule_by: "steps" runs the schedule's steps (``max_minutes`` then only caps them);
    "time" makes ``max_minutes`` the schedule: the stages and the decay are shares of the
    wall time, so a bigger budget trains longer (the warm-up stays in steps).
    """

    workers: int = 2
    cpus_per_worker: float = 0.5
    threads_per_worker: int = 1
    use_gpu: bool = False
    fsdp: bool = True
    precision: str = "fp32"
    checkpoint_every: int = 100
    max_failures: int = 1
    max_minutes: float | None = None
    schedule_by: str = "steps"
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"run.workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0 or self.threads_per_worker < 1:
            raise ValueError(
                f"run.cpus_per_worker must be > 0 and run.threads_per_worker >= 1, got "
                f"{self.cpus_per_worker} and {self.threads_per_worker}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"run.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("run.checkpoint_every and run.log_every must be >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"run.max_minutes must be > 0, got {self.max_minutes}")
        if self.schedule_by not in SCHEDULE_BY:
            raise ValueError(
                f"run.schedule_by must be one of {SCHEDULE_BY}, got {self.schedule_by!r}"
            )
        if self.schedule_by == "time" and self.max_minutes is None:
            raise ValueError("run.schedule_by 'time' needs run.max_minutes (the budget to fill)")


def _default_schedule() -> list[StageConfig]:
    return [
        StageConfig(name="align", steps=600, towers="image"),
        StageConfig(name="fuse", steps=300),
    ]


@section
class TrainConfig:
    """The whole training run."""

    model: ModelConfig
    head: HeadConfig
    data: DataConfig
    optim: OptimConfig
    schedule: list[StageConfig] = field(default_factory=_default_schedule)
    run: RunConfig

    def __post_init__(self):
        if not self.schedule:
            raise ValueError("schedule needs at least one stage")
        names = [s.name for s in self.schedule]
        if len(set(names)) != len(names):
            raise ValueError(f"schedule stage names must be unique, got {names}")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.schedule)

    def progress(self, step: int, time_fraction: float = 0.0) -> float:
        """How far the run is, in [0, 1]: by wall time when the budget is the schedule, else
        by steps, or by wall time when a budget is set and time runs out first (so a capped
        run still goes through every stage and ends with a decayed learning rate)."""
        if self.run.schedule_by == "time":
            return min(1.0, time_fraction)
        return min(1.0, max(step / self.total_steps, time_fraction))

    def stage_at(self, progress: float) -> StageConfig:
        """The stage a run at ``progress`` is in (each stage owns its share of the steps)."""
        done = 0
        for stage in self.schedule:
            done += stage.steps
            if progress < done / self.total_steps:
                return stage
        return self.schedule[-1]

    def lr_factor(self, step: int, progress: float) -> float:
        """Linear warm-up over the first steps, then cosine decay to 5 % at the end of the run."""
        warm = self.optim.warmup_steps
        if step < warm:
            return (step + 1) / warm
        start = warm / self.total_steps if self.run.schedule_by == "steps" else 0.0
        rest = (progress - start) / max(1e-9, 1.0 - start)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, rest))))

    def with_total_steps(self, steps: int) -> TrainConfig:
        """The same schedule scaled to ``steps`` in all (each stage keeps its share, >= 1),
        scheduled by steps."""
        total = self.total_steps
        stages = [
            dataclasses.replace(s, steps=max(1, round(s.steps * steps / total)))
            for s in self.schedule
        ]
        run = dataclasses.replace(self.run, schedule_by="steps")
        return dataclasses.replace(self, schedule=stages, run=run)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return _build(cls, _read(cls, data or {}, ""))


def _read(cls, data, path: str) -> dict:
    """``data`` for dataclass ``cls`` as plain nested dicts with every value read as its field's
    type by pydantic (a YAML string such as ``1e-3``, which YAML 1.1 does not read as a number,
    becomes the float the field wants; a number is never read as a bool or a bool as a number);
    unknown keys and values of the wrong type are errors that name them."""
    where = path or "the config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]  # not the ClassVars among the hints
    unknown = set(data) - set(fields)
    if unknown:
        known = ", ".join(fields)
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {where} (known: {known})")
    return {
        key: _value(hints[key], value, f"{path}.{key}" if path else key)
        for key, value in data.items()
    }


def _value(hint, value, path: str):
    if dataclasses.is_dataclass(value):
        return value
    if dataclasses.is_dataclass(hint):
        return _read(hint, value, path)
    item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
    if dataclasses.is_dataclass(item):
        if not isinstance(value, list):
            raise ValueError(f"{path} must be a list, got {value!r}")
        return [_value(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    from pydantic import TypeAdapter, ValidationError

    try:  # numbers strictly (no bool for an int, no 2.5 for an int), strings and lists laxly
        return TypeAdapter(hint).validate_python(value, strict=isinstance(value, int | float))
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise ValueError(f"{path} must be {_type_name(hint)}, got {value!r} ({reason})") from None


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _build(cls, data: dict):
    """Build dataclass ``cls`` from the dicts :func:`_read` returns."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value)
        elif dataclasses.is_dataclass(item):
            value = [_build(item, v) if isinstance(v, dict) else v for v in value]
        kwargs[key] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def parse_sets(pairs: list[str] | None) -> dict:
    """``["optim.lr=1e-3", "run.workers=4"]`` (``--set`` on the command line) as
    ``{"optim.lr": "1e-3", "run.workers": 4}``: each value read as YAML, then as its field's
    type when the config is built."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE (e.g. optim.lr=1e-3), got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _set_existing(tree: dict, dotted: str, value) -> None:
    """Set ``dotted`` in a resolved config dict, naming the first key that does not exist (a
    list takes an index: ``schedule.0.steps``)."""
    node, keys = tree, dotted.split(".")
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth]) or "the config"
        if isinstance(node, list):
            if not (key.isdigit() and int(key) < len(node)):
                raise ValueError(f"--set {dotted}: {where} has {len(node)} entries, no {key!r}")
            key = int(key)
        elif not isinstance(node, dict) or key not in node:
            known = ", ".join(node) if isinstance(node, dict) else "none: it is a value"
            raise ValueError(f"--set {dotted}: no key {key!r} in {where} (known: {known})")
        if depth == len(keys) - 1:
            node[key] = value
        node = node[key]


def load_config(
    path: str | None = None, overrides: dict | None = None, sets: dict | None = None
) -> TrainConfig:
    """Read a YAML config (or the defaults), apply ``{"run.workers": 2, ...}`` overrides (None
    values skipped), then ``sets`` (from :func:`parse_sets`: keys must name existing fields)."""
    data = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(data, dotted, value)
    cfg = TrainConfig.from_dict(data)
    if not sets:
        return cfg
    tree = cfg.to_dict()
    for dotted, value in sets.items():
        _set_existing(tree, dotted, value)
    return TrainConfig.from_dict(tree)


def train_config(
    path: str | None = None,
    *,
    workers: int | None = None,
    steps: int | None = None,
    max_minutes: float | None = None,
    use_gpu: bool | None = None,
    sets: list[str] | None = None,
) -> TrainConfig:
    """The config from YAML (or defaults) with the command line's usual overrides and its
    ``--set KEY=VALUE`` pairs: a budget without ``steps`` is the schedule (filled), with
    ``steps`` a cap."""
    overrides = {"run.workers": workers, "run.max_minutes": max_minutes, "run.use_gpu": use_gpu}
    if max_minutes and not steps:
        overrides["run.schedule_by"] = "time"
    cfg = load_config(path, overrides, parse_sets(sets))
    return cfg.with_total_steps(steps) if steps else cfg
