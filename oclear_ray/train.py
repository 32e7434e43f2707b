"""The train stage: Ray Data ingest -> Ray Train workers (FSDP2 encoders + sharded classifier).

``fit`` runs on the driver: it validates the inputs (quarantining bad rows), builds the class
map and the tokenizer, wires the Ray Data pipelines to a ``TorchTrainer`` and returns where the
exported model is. ``train_loop_per_worker`` is what each worker runs: build, shard, restore,
step, checkpoint, export. Rerunning with the same work directory resumes from the last
checkpoint, with the same or another number of workers. The worker step (``train_step``,
precision) imports only torch, timm and transformers, so ``bench/gpu_check.py`` runs it on a bare
GPU machine; the storage layer (pyarrow, fsspec) is imported where the driver and the export use
it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from oclear_ray import parallel
from oclear_ray.classifier import ClassifierConfig, ShardedMarginSoftmax
from oclear_ray.config import TrainConfig
from oclear_ray.model import RetrievalModel
from oclear_ray.preprocess import normalize

LOG = "[oclear train]"


# --------------------------------------------------------------------------- worker side


@dataclass
class Batch:
    """One worker's step input, as tensors on its device."""

    doc_images: torch.Tensor
    doc_ids: torch.Tensor
    doc_mask: torch.Tensor
    doc_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor


def _forever(shard, batch_size: int, name: str, device):
    """Batches of a dataset shard on ``device``, epoch after epoch; the next batches are
    fetched and moved while a step runs."""
    while True:
        empty = True
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=4 * batch_size,
            device=device,
            prefetch_batches=2,
        ):
            empty = False
            yield batch
        if empty:
            raise ValueError(
                f"the {name} shard of a worker has fewer rows than one batch ({batch_size}); "
                "lower the batch size or the number of workers"
            )


def _make_batch(docs: dict, queries: dict | None, pre, device) -> Batch:
    extra = docs["has_query_image"].bool()
    q_images = [docs["query_image"][extra]]
    q_labels = [docs["label"][extra]]
    if queries is not None:
        has = queries["has_image"].bool()
        q_images.append(queries["image"][has])
        q_labels.append(queries["label"][has])
    # rows are padded to max_text_length; trailing columns that are padding in every row change
    # nothing (masked out everywhere) and cost the text tower most of its time
    width = max(1, int(docs["attention_mask"].sum(1).max()))
    return Batch(
        doc_images=normalize(docs["image"], pre, device),
        doc_ids=docs["input_ids"][:, :width].to(device),
        doc_mask=docs["attention_mask"][:, :width].to(device),
        doc_labels=docs["label"].to(device),
        query_images=normalize(torch.cat(q_images), pre, device),
        query_labels=torch.cat(q_labels).to(device),
    )


def train_step(
    model, head, batch: Batch, *, towers: str, text_weight: float | None = None
) -> torch.Tensor:
    """Embed documents and query views; one margin softmax over all of them (they share the
    class centres).

    ``towers="image"`` (alignment stage) leaves the text out; ``"all"`` adds the documents fused
    with their text, and trains the text query head on the documents' own titles. The image-only
    document embedding stays in the loss in both, so documents without text, and the image
    tower under the fusion, stay aligned. ``text_weight`` (``head.text_weight``): None puts all
    rows in one softmax; a number adds the text rows' loss, so weighted, to the image rows' loss.
    """
    use_text = towers == "all"
    ids, mask = (batch.doc_ids, batch.doc_mask) if use_text else (None, None)
    out = model(batch.doc_images, batch.query_images, ids, mask)  # ``encode_pair``
    embs, labels = [out.doc, out.query], [batch.doc_labels, batch.query_labels]
    has_text = batch.doc_mask.bool().any(1)
    if not use_text:
        return head(torch.cat(embs), torch.cat(labels))
    text_embs = [out.fused[has_text], out.text[has_text]]
    text_labels = [batch.doc_labels[has_text]] * 2
    if text_weight is None:
        return head(torch.cat(embs + text_embs), torch.cat(labels + text_labels))
    # every rank calls the head twice (it gathers rows across ranks), even with no text rows
    return head(torch.cat(embs), torch.cat(labels)) + text_weight * head(
        torch.cat(text_embs), torch.cat(text_labels)
    )


def _head_optim_state(head, head_optim) -> dict:
    """The classifier optimizer's per-row state (e.g. Adam moments) as ``Shard(0)`` tensors."""
    state = head_optim.state[head.weight]
    rows = head.weight.shape
    return {
        k: parallel.to_row_sharded(v, head.config.num_classes, head.group)
        if torch.is_tensor(v) and v.shape == rows
        else v
        for k, v in state.items()
    }


def _checkpoint_state(model, optim, head, head_optim) -> dict:
    """Everything a resume needs, as DCP-savable (sharded DTensor) state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optim)
    return {
        "model": model_state,
        "optim": optim_state,
        "head": head.state_dict(),
        "head_optim": _head_optim_state(head, head_optim),
        "step": torch.zeros((), dtype=torch.int64),
        "progress": torch.zeros((), dtype=torch.float64),
    }


def _restore(checkpoint, model, optim, head, head_optim) -> tuple[int, float]:
    """Load a checkpoint taken with any number of workers; return the step and the share of
    the run (progress) to continue from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _checkpoint_state(model, optim, head, head_optim)
    with checkpoint.as_directory() as path:
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    head.load_state_dict(state["head"])
    n, start, stop = head.config.num_classes, head.start, head.stop
    head_optim.state[head.weight] = {
        k: parallel.from_row_sharded(v, n, start, stop).clone() if k in _ROW_STATE else v
        for k, v in state["head_optim"].items()
    }
    return int(state["step"]), float(state["progress"])


_ROW_STATE = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def _save(step: int, progress: float, model, optim, head, head_optim, metrics: dict) -> None:
    """DCP checkpoint (each rank writes its shards) reported to Ray Train."""
    import ray.train
    import torch.distributed.checkpoint as dcp

    state = _checkpoint_state(model, optim, head, head_optim)
    state["step"] = torch.tensor(step, dtype=torch.int64)
    state["progress"] = torch.tensor(progress, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        dcp.save(state, checkpoint_id=tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _build(cfg: TrainConfig, num_classes: int, device):
    torch.manual_seed(cfg.run.seed)  # identical full parameters on every rank before sharding
    model = RetrievalModel(cfg.model).to(device)
    head_cfg = ClassifierConfig.of(cfg.head, num_classes=num_classes, dim=cfg.model.embed_dim)
    head = ShardedMarginSoftmax(head_cfg).to(device)
    if head.world_size > 1 and cfg.run.fsdp:
        parallel.apply_fsdp(
            model, model.shard_units(), mp_policy=mixed_precision_policy(cfg, device)
        )
    elif head.world_size > 1:
        model = parallel.apply_ddp(model)
    optim = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    head_optim = torch.optim.AdamW(head.parameters(), lr=cfg.optim.head_lr, weight_decay=0.0)
    _init_state(optim)
    _init_state(head_optim)
    return model, head, optim, head_optim


def mixed_precision_policy(cfg: TrainConfig, device: torch.device):
    """bf16 on GPU: FSDP2's policy (parameters gathered and computed in bf16, gradients reduced
    in float32); None otherwise (CPU and fp32 runs), where :func:`autocast` does the casting."""
    if cfg.run.precision != "bf16" or device.type != "cuda":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for the encoders' forward when ``run.precision`` is bf16 (whatever FSDP
    casts, ops autocast keeps in float32 stay there); the classifier's softmax is float32
    inside the head either way."""
    return torch.autocast(device.type, torch.bfloat16, enabled=cfg.run.precision == "bf16")


def _init_state(optim) -> None:
    """Give every parameter its optimizer state with a zero step (lr 0, zero gradients), so
    checkpoints hold the same keys whichever towers a stage trained."""
    lrs = [g["lr"] for g in optim.param_groups]
    for group in optim.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optim.step()
    optim.zero_grad(set_to_none=True)
    for group, lr in zip(optim.param_groups, lrs, strict=True):
        group["lr"] = lr


def _set_lr(cfg: TrainConfig, step: int, progress: float, optim, head_optim) -> None:
    f = cfg.lr_factor(step, progress)
    for group in optim.param_groups:
        group["lr"] = cfg.optim.lr * f
    for group in head_optim.param_groups:
        group["lr"] = cfg.optim.head_lr * f


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build, shard, restore, train to the step budget or the deadline,
    checkpoint, and export (rank 0 writes the model)."""
    import ray.train
    import ray.train.torch

    from oclear_ray.tracking import RunRef

    cfg = TrainConfig.from_dict(config["train"])
    torch.set_num_threads(cfg.run.threads_per_worker)
    device = ray.train.torch.get_device()
    model, head, optim, head_optim = _build(cfg, config["num_classes"], device)
    checkpoint = ray.train.get_checkpoint()
    step, done_share = (0, 0.0)
    if checkpoint:
        step, done_share = _restore(checkpoint, model, optim, head, head_optim)
    resumed_from = step
    by_time = cfg.run.schedule_by == "time"
    pre = cfg.model.preprocess
    docs = _forever(ray.train.get_dataset_shard("docs"), cfg.data.batch_size, "docs", device)
    shard = ray.train.get_dataset_shard("queries") if config["has_queries"] else None
    queries = _forever(shard, cfg.data.query_batch_size, "queries", device) if shard else None
    window = None  # (start, seconds): the schedule's time runs from the first batch
    rank0 = ray.train.get_context().get_world_rank() == 0
    tracked = RunRef(**config["tracking"]) if rank0 and config.get("tracking") else None
    clock = {"wait": 0.0, "total": 0.0, "samples": 0, "run_wait": 0.0, "run_total": 0.0}
    clock["run_samples"] = 0
    while by_time or step < cfg.total_steps:
        t0 = time.monotonic()
        batch = _make_batch(next(docs), next(queries) if queries else None, pre, device)
        t1 = time.monotonic()
        if window is None:
            window = (time.time(), _time_budget(time.time(), config.get("deadline")))
        elapsed = (time.time() - window[0]) / window[1] if window[1] else 0.0
        elapsed = done_share + (1.0 - done_share) * elapsed  # a resumed run goes on from its share
        progress = cfg.progress(step, parallel.max_over_ranks(elapsed))
        stage = cfg.stage_at(progress)
        _set_lr(cfg, step, progress, optim, head_optim)
        with autocast(cfg, device):
            loss = train_step(
                model, head, batch, towers=stage.towers, text_weight=cfg.head.text_weight
            )
        loss.backward()
        optim.step(), head_optim.step()
        optim.zero_grad(set_to_none=True), head_optim.zero_grad(set_to_none=True)
        step += 1
        _tick(clock, t0, t1, batch)
        out_of_time = progress >= 1.0 and (by_time or step < cfg.total_steps)
        done = out_of_time or (not by_time and step >= cfg.total_steps)
        keep = done or step % cfg.run.checkpoint_every == 0
        if keep or step % cfg.run.log_every == 0:
            metrics = _metrics(step, stage.name, loss, clock, head.world_size)
            metrics.update(resumed_from=resumed_from, progress=progress)
            _report(metrics, (model, optim, head, head_optim) if keep else None)
            if tracked is not None:
                tracked.log_metrics(metrics, step)
        if done:
            break
    _export(model, cfg, config)


def _tick(clock: dict, t0: float, t1: float, batch: Batch) -> None:
    """Count a step's data wait, time and samples (the first batch's wait, the pipeline
    starting up, is a one-off kept apart)."""
    if "startup_wait_s" not in clock:
        clock["startup_wait_s"] = t1 - t0
        return
    clock["wait"] += t1 - t0
    clock["total"] += time.monotonic() - t0
    clock["samples"] += batch.doc_labels.shape[0] + batch.query_labels.shape[0]


def _report(metrics: dict, state: tuple | None) -> None:
    """Report to Ray Train, with a checkpoint of ``state`` when given; rank 0 logs the line."""
    import ray.train

    if state is not None:
        _save(metrics["step"], metrics["progress"], *state, metrics)
    else:
        ray.train.report(metrics)
    if ray.train.get_context().get_world_rank() == 0:
        line = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
        )
        print(LOG, line, flush=True)


def _time_budget(started: float, deadline: float | None) -> float | None:
    """Seconds this worker may train before the run's deadline, keeping a margin to checkpoint
    and export (10 % of the time left, at most 30 s)."""
    if deadline is None:
        return None
    left = deadline - started
    return max(1.0, left - min(30.0, 0.1 * left))


def _metrics(step, stage: str, loss, clock, world) -> dict:
    """Loss, throughput and the data-wait fraction since the last report and over the run (after
    the first batch, whose wait for the pipeline to start is reported on its own)."""
    total = max(clock["total"], 1e-9)
    clock["run_wait"] += clock["wait"]
    clock["run_total"] += clock["total"]
    clock["run_samples"] += clock["samples"]
    metrics = {
        "step": step,
        "stage": stage,
        "loss": float(loss.detach()),
        "samples_per_s": clock["samples"] * world / total,
        "run_samples_per_s": clock["run_samples"] * world / max(clock["run_total"], 1e-9),
        "data_wait": clock["wait"] / total,
        "run_data_wait": clock["run_wait"] / max(clock["run_total"], 1e-9),
        "startup_wait_s": clock["startup_wait_s"],
    }
    clock.update(wait=0.0, total=0.0, samples=0)
    return metrics


def _export(model, cfg: TrainConfig, config: dict) -> None:
    """Gather the full weights (a collective) and let rank 0 export the encoders."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from oclear_ray import storage
    from oclear_ray.export import CONFIG_FILE, export_model
    from oclear_ray.text import TextTokenizer

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if ray.train.get_context().get_world_rank() != 0:
        return
    plain = RetrievalModel(cfg.model)
    plain.load_state_dict(state)
    tokenizer = TextTokenizer.from_file(config["tokenizer_path"])
    with tempfile.TemporaryDirectory() as tmp:
        export_model(plain.eval(), tokenizer, tmp)
        storage.publish_dir(tmp, config["model_dir"], manifest=CONFIG_FILE)


# --------------------------------------------------------------------------- driver side


@dataclass
class TrainResult:
    model_dir: str
    num_classes: int
    steps: int
    metrics: dict | None
    quarantined: dict
    class_map_version: str | None = None
    views: dict | None = None  # the document view chosen on validation queries


def _validated(path: str, contract, workdir: str, cache: str | None, progress=None):
    """The clean dataset of ``path`` (``read.prepare``: checked once, bad rows quarantined
    under ``workdir``) and its report."""
    from oclear_ray.read import prepare

    prepared = prepare(path, contract, workdir, cache=cache, progress=progress)
    return prepared.dataset(), prepared.report


def _pipeline(ds, *, view: str, cfg: TrainConfig, class_map: dict, tokenizer_path: str):
    """Apply the class map, decode and tokenise once (cached in the object store when it
    fits); per pass, in a random block order, resample documents by their class's sampling
    weight and augment (in at most ``data.view_tasks`` tasks at once; a small set is repeated to
    fill ``PASS_STEPS``)."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from oclear_ray.classmap import apply_class_map, class_weights
    from oclear_ray.ingest import PrepareBatches, augment_docs, augment_queries

    pre = cfg.model.preprocess
    ds = ds.map_batches(
        apply_class_map, fn_kwargs={"class_map": class_map}, batch_format="pyarrow", num_cpus=0.25
    )
    prepared = ds.map_batches(
        PrepareBatches,
        batch_format="pyarrow",
        batch_size=256,
        num_cpus=0.5,
        compute=ActorPoolStrategy(min_size=1, max_size=max(2, 2 * cfg.run.workers)),
        fn_constructor_kwargs=dict(
            class_map={str(k): k for k in range(class_map["num_classes"])},
            tokenizer_path=tokenizer_path,
            preprocess=pre,
        ),
    )
    if cfg.data.cache:
        ds = _repeated(prepared.materialize(), cfg, view)
    else:
        ds = prepared.randomize_block_order()
    kwargs = dict(augment=cfg.data.augment, strength=cfg.data.augment_strength)
    if view == "doc":
        fn = augment_docs
        kwargs |= {"doc_as_query_rate": cfg.data.doc_as_query_rate, "view": cfg.data.doc_query_view}
        kwargs["weights"] = class_weights(class_map)
    else:
        fn = augment_queries
    tasks = cfg.data.view_tasks or cfg.run.workers
    return ds.map_batches(
        fn,
        fn_kwargs=kwargs,
        batch_format="numpy",
        batch_size=128,
        num_cpus=0.5,
        compute=TaskPoolStrategy(size=tasks),
    )


#: a pass of a training pipeline covers at least this many steps: a small cached set is
#: repeated (each copy resampled and augmented afresh), since every pass starts Ray Data's
#: execution anew (its tasks, the split among workers), and a pass of a few batches waits on it
PASS_STEPS = 64


def _repeated(ds, cfg: TrainConfig, view: str):
    """The materialized ``ds`` as one pass: enough copies of it (its blocks, not copied) to
    fill ``PASS_STEPS`` steps of every worker, each in its own random block order."""
    batch = cfg.data.batch_size if view == "doc" else cfg.data.query_batch_size
    copies = math.ceil(PASS_STEPS * batch * cfg.run.workers / max(ds.count(), 1))
    ordered = [ds.randomize_block_order() for _ in range(max(copies, 1))]
    return ordered[0].union(*ordered[1:]) if len(ordered) > 1 else ordered[0]


def fit(
    cfg: TrainConfig,
    *,
    catalog: str,
    workdir: str,
    queries: str | None = None,
    class_map: dict | str | None = None,
    name: str = "train",
    progress=None,
    on_report=None,
    tracking=None,
    cache: str | None = None,
    views=None,
) -> TrainResult:
    """Train on ``catalog`` (and query photos) and export the encoders to WORKDIR/train/model;
    with ``tracking`` (``tracking.Tracking``), one MLflow run holds the resolved config and
    rank 0's metrics; ``on_report(metrics)`` is told rank 0's reports in this process as it
    trains. The inputs' clean copies (``read.prepare``) live in ``cache`` (default
    WORKDIR/clean: a pipeline's probe trainings share the pipeline's). With ``views`` (a
    ``views.Split`` whose held-out photos ``queries`` lacks), the export's document view and
    shape code are then chosen on them (``views.choose_views``)."""
    from oclear_ray import storage
    from oclear_ray.export import read_manifest
    from oclear_ray.model import resolve_pretrained
    from oclear_ray.runtime import forward_reports
    from oclear_ray.tracking import start_run

    deadline = time.time() + 60 * cfg.run.max_minutes if cfg.run.max_minutes else None
    cfg = replace(cfg, model=resolve_pretrained(cfg.model))  # before any data or worker
    workdir = storage.absolute(workdir)  # Ray Train's workers do not run in this directory
    train_dir = storage.join(workdir, "train")
    data = _training_data(cfg, catalog, queries, workdir, class_map, cache, progress)
    cfg, class_map = data.cfg, data.class_map
    model_dir = storage.absolute(storage.join(train_dir, "model"))
    inputs = {"catalog": catalog, "queries": queries, "workdir": workdir, "name": name}
    inputs |= {"class_map": class_map["version"], "num_classes": class_map["num_classes"]}
    params = {"config": cfg.to_dict(), "inputs": inputs}
    with (
        start_run(tracking, "train", params=params) as run,
        forward_reports(on_report) as callbacks,
    ):
        result = _trainer(cfg, data, name, run, callbacks, train_dir, deadline).fit()
        storage.write_bytes(
            storage.join(model_dir, "class_map.json"),
            json.dumps(class_map, sort_keys=True).encode(),
        )
        choice = _choose_views(model_dir, views, cfg, run) if views is not None else None
        if run is not None:
            run.set_tags({"model_version": read_manifest(model_dir)["model_version"]})
    return TrainResult(
        model_dir,
        class_map["num_classes"],
        (result.metrics or {}).get("step", cfg.total_steps),
        result.metrics,
        data.quarantined,
        class_map_version=class_map["version"],
        views=choice,
    )


def _choose_views(model_dir: str, split, cfg: TrainConfig, run) -> dict:
    """The document view and shape code chosen on ``split``'s held-out photos, written into
    the export (a new model version) and, when tracked, the run."""
    from oclear_ray.export import revise
    from oclear_ray.views import choose_views

    choice = choose_views(model_dir, split, cfg.model.shape.weight)
    view, weight, levels = choice["doc_view"], choice["shape_weight"], choice["shape_levels"]
    revise(model_dir, doc_view=view, shape_weight=weight, shape_levels=levels, choice=choice)
    if run is not None:
        run.set_tags({"doc_view": view, "shape_weight": weight, "shape_levels": str(levels)})
        run.log_metrics({"validation_recall_at_1": choice["recall@1"]})
    return choice


def _trainer(cfg, data, name, run, callbacks, train_dir, deadline):
    """The Ray Train ``TorchTrainer`` of one training: its run named ``name`` under
    WORKDIR/train/runs (a rerun with the same name resumes from its checkpoints)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from oclear_ray import storage

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "num_classes": data.class_map["num_classes"],
            "has_queries": "queries" in data.datasets,
            "tokenizer_path": data.tokenizer_path,
            "model_dir": storage.absolute(storage.join(train_dir, "model")),
            "deadline": deadline,
            "tracking": run and {"uri": run.uri, "run_id": run.run_id},
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.absolute(storage.join(train_dir, "runs")),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=data.datasets,
    )


@dataclass
class _TrainingData:
    cfg: TrainConfig  # with the tokenizer's vocabulary size
    class_map: dict
    tokenizer_path: str
    datasets: dict  # "docs" and, with query photos, "queries"
    quarantined: dict  # rows quarantined per input


def _training_data(cfg, catalog, queries, workdir, class_map, cache, progress) -> _TrainingData:
    """The clean inputs, the class map (found, or the raw labels), the tokenizer and the
    per-epoch pipelines of documents and query photos."""
    from oclear_ray import storage
    from oclear_ray.classmap import find_class_map, raw_class_map
    from oclear_ray.contract import CATALOG, QUERIES

    docs, doc_report = _validated(catalog, CATALOG, workdir, cache, progress)
    q_ds, q_report = (
        _validated(queries, QUERIES, workdir, cache, progress) if queries else (None, None)
    )
    class_map = find_class_map(class_map, workdir) or raw_class_map(
        doc_report.label_set | (q_report.label_set if q_report else set())
    )
    if not class_map["labels"]:
        raise ValueError(f"no labelled documents in {catalog}: training needs a label column")
    tokenizer_path = _tokenizer(storage.join(workdir, "train"), docs, cfg)
    vocab = _vocab_size(tokenizer_path)
    cfg = replace(cfg, model=replace(cfg.model, text=replace(cfg.model.text, vocab_size=vocab)))
    views = {"docs": ("doc", docs), "queries": ("query", q_ds)}
    kwargs = dict(cfg=cfg, class_map=class_map, tokenizer_path=tokenizer_path)
    with ThreadPoolExecutor(2) as pool:  # both pipelines cache their rows at once
        made = {
            name: pool.submit(_pipeline, ds, view=view, **kwargs)
            for name, (view, ds) in views.items()
            if ds is not None
        }
        datasets = {name: future.result() for name, future in made.items()}
    quarantined = {"catalog": doc_report.quarantined}
    if q_report:
        quarantined["queries"] = q_report.quarantined
    return _TrainingData(cfg, class_map, tokenizer_path, datasets, quarantined)


def _tokenizer(train_dir: str, docs, cfg: TrainConfig) -> str:
    """A pretrained text tower's own tokenizer; else one trained on the catalog's text once
    (reused on resume)."""
    from oclear_ray import storage
    from oclear_ray.text import TextTokenizer, train_tokenizer

    path = storage.join(train_dir, "tokenizer.json")
    if cfg.model.text.pretrained_path:
        tok = TextTokenizer.from_pretrained(cfg.model.text.pretrained_path)
        storage.write_bytes(path, tok.tokenizer.to_str().encode())
    elif not storage.exists(path):
        texts = (
            t
            for b in docs.select_columns(["text"]).iter_batches(batch_format="pyarrow")
            for t in b.column("text").to_pylist()
        )
        tok = train_tokenizer(texts, vocab_size=cfg.model.text.vocab_size)
        storage.write_bytes(path, tok.tokenizer.to_str().encode())
    return storage.absolute(path)


def _vocab_size(tokenizer_path: str) -> int:
    from oclear_ray.text import TextTokenizer

    return TextTokenizer.from_file(tokenizer_path).vocab_size
