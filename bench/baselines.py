"""The two loops `bench/train.py` sets beside the platform, same data and budget.

- ``plain``: what a user writes in an afternoon (the issue's recipe): one process, torch's
  default threads; a 4-block CNN (two 3x3 conv + BatchNorm + ReLU, then a 2x2 max-pool per block;
  32-64-128-256 channels; global average pool; linear to 128) at 64 px composited on white,
  normalised as (x/255 - 0.5)/0.25; CosFace s 30, m 0.35 over every label with a plain weight;
  AdamW lr 2e-3, weight decay 1e-4; batches of 128 drawn uniformly from catalog images and
  training queries, rolled by up to 6 px and colour-jittered per channel; one net embeds
  queries and documents. Hand-written on purpose: it is the baseline, not a library.
- ``bare``: the platform's own model, loss, data preparation and schedule in one process, with
  no Ray and no FSDP: what the platform's distribution costs is its samples/s against this.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from oclear_ray.classmap import raw_class_map
from oclear_ray.config import TrainConfig
from oclear_ray.export import export_model
from oclear_ray.ingest import PrepareBatches, augment_docs, augment_queries
from oclear_ray.preprocess import PreprocessConfig, decode_image
from oclear_ray.text import train_tokenizer
from oclear_ray.train import _build, _make_batch, _set_lr, train_step

PLAIN_SIZE = 64


# --------------------------------------------------------------------------- plain


class PlainNet(nn.Module):
    def __init__(self, dim: int = 128):
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 128, 256):
            for i in range(2):
                layers += [nn.Conv2d(width if i == 0 else out, out, 3, padding=1, bias=False)]
                layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            width = out
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(256, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.features(x).mean((2, 3))), dim=1)


def plain_pixels(images) -> torch.Tensor:
    pre = PreprocessConfig(image_size=PLAIN_SIZE)
    pixels = np.stack([decode_image(b, pre) for b in images]).astype(np.float32)
    return torch.from_numpy((pixels / 255.0 - 0.5) / 0.25).permute(0, 3, 1, 2).contiguous()


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image rolled by up to 6 px each way, each channel scaled and shifted."""
    shifts = torch.randint(-6, 7, (x.shape[0], 2), generator=g).tolist()
    rolled = [torch.roll(img, s, dims=(1, 2)) for img, s in zip(x, shifts, strict=True)]
    x = torch.stack(rolled)
    scale = 1 + 0.2 * torch.randn(x.shape[0], 3, 1, 1, generator=g)
    return x * scale + 0.2 * torch.randn(x.shape[0], 3, 1, 1, generator=g)


def train_plain(catalog: pa.Table, queries: pa.Table, minutes: float, seed: int = 0):
    """Train the plain loop for ``minutes``; return (embed function, steps, samples/s)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    labels = sorted(set(catalog["label"].to_pylist()))
    index = {v: i for i, v in enumerate(labels)}
    pool = [
        (b, index[v])
        for b, v in zip(catalog["image"].to_pylist(), catalog["label"].to_pylist(), strict=True)
    ]
    pool += [
        (b, index[v])
        for b, v in zip(queries["image"].to_pylist(), queries["label"].to_pylist(), strict=True)
        if b is not None and v in index
    ]
    x_all = plain_pixels([b for b, _ in pool])
    y_all = torch.tensor([y for _, y in pool])
    net = PlainNet()
    weight = nn.Parameter(torch.randn(len(labels), 128) * 0.01)
    optim = torch.optim.AdamW([*net.parameters(), weight], lr=2e-3, weight_decay=1e-4)
    deadline, steps, seen, started = time.time() + 60 * minutes, 0, 0, time.time()
    net.train()
    while time.time() < deadline:
        rows = torch.randint(0, len(y_all), (128,), generator=g)
        x, y = _jitter(x_all[rows], g), y_all[rows]
        cos = net(x) @ F.normalize(weight, dim=1).t()
        logits = 30.0 * (cos - 0.35 * F.one_hot(y, len(labels)))
        loss = F.cross_entropy(logits, y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        steps, seen = steps + 1, seen + len(rows)
    net.eval()

    @torch.no_grad()
    def embed(images) -> np.ndarray:
        return np.concatenate(
            [net(plain_pixels(images[i : i + 256])).numpy() for i in range(0, len(images), 256)]
        )

    return embed, steps, seen / max(time.time() - started, 1e-9)


# --------------------------------------------------------------------------- bare


def _prepared(table: pa.Table, class_map: dict, tokenizer_path: str, pre) -> dict:
    ids = {str(k): k for k in range(class_map["num_classes"])}
    if "text" not in table.column_names:  # image queries
        table = table.append_column("text", pa.nulls(table.num_rows, pa.string()))
    table = table.set_column(
        table.column_names.index("label"),
        "label",
        pa.array([str(class_map["labels"].get(v, -1)) for v in table["label"].to_pylist()]),
    )
    return PrepareBatches(class_map=ids, tokenizer_path=tokenizer_path, preprocess=pre)(table)


def _draw(data: dict, n: int, rng: np.random.Generator) -> dict:
    rows = rng.choice(len(data["label"]), n, replace=len(data["label"]) < n)
    return {k: v[rows] for k, v in data.items()}


def _bare_batch(docs, qs, cfg: TrainConfig, rng, device):
    """One step's batch, drawn and augmented as the platform's Ray Data pipeline does."""
    d = augment_docs(
        _draw(docs, cfg.data.batch_size, rng),
        augment=cfg.data.augment,
        doc_as_query_rate=cfg.data.doc_as_query_rate,
        view=cfg.data.doc_query_view,
        strength=cfg.data.augment_strength,
    )
    q = augment_queries(
        _draw(qs, cfg.data.query_batch_size, rng),
        augment=cfg.data.augment,
        strength=cfg.data.augment_strength,
    )
    torch_batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}
    q_batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in q.items()}
    return _make_batch(torch_batch, q_batch, cfg.model.preprocess, device)


def train_bare(
    cfg: TrainConfig,
    catalog: pa.Table,
    queries: pa.Table,
    minutes: float | None,
    out_dir: str,
    steps: int | None = None,
) -> tuple[int, float]:
    """The platform's model and loss in this process for ``minutes`` (its schedule by time),
    or for ``steps`` (its schedule by steps), with its data preparation and augmentation,
    exported to ``out_dir``; return (steps, samples/s)."""
    torch.set_num_threads(cfg.run.workers * cfg.run.threads_per_worker)  # the same cores
    if steps:
        cfg = cfg.with_total_steps(steps)
        run = dataclasses.replace(cfg.run, workers=1, max_minutes=None)
    else:
        run = dataclasses.replace(cfg.run, workers=1, max_minutes=minutes, schedule_by="time")
    cfg = dataclasses.replace(cfg, run=run)
    class_map = raw_class_map(catalog["label"].to_pylist() + queries["label"].to_pylist())
    tok = train_tokenizer(catalog["text"].to_pylist(), vocab_size=cfg.model.text.vocab_size)
    pre = cfg.model.preprocess
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/tokenizer.json"
        tok.tokenizer.save(path)
        docs = _prepared(catalog, class_map, path, pre)
        qs = _prepared(queries, class_map, path, pre)
    text = dataclasses.replace(cfg.model.text, vocab_size=tok.vocab_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=text))
    device = torch.device("cpu")
    model, head, optim, head_optim = _build(cfg, class_map["num_classes"], device)
    rng, step, seen, started = np.random.default_rng(cfg.run.seed), 0, 0, time.time()
    budget = 60 * (minutes or float("inf"))
    while (progress := cfg.progress(step, (time.time() - started) / budget)) < 1.0:
        batch = _bare_batch(docs, qs, cfg, rng, device)
        _set_lr(cfg, step, progress, optim, head_optim)
        loss = train_step(
            model,
            head,
            batch,
            towers=cfg.stage_at(progress).towers,
            text_weight=cfg.head.text_weight,
        )
        loss.backward()
        optim.step(), head_optim.step()
        optim.zero_grad(set_to_none=True), head_optim.zero_grad(set_to_none=True)
        step, seen = step + 1, seen + batch.doc_labels.shape[0] + batch.query_labels.shape[0]
    rate = seen / max(time.time() - started, 1e-9)
    export_model(model.eval(), tok, out_dir)  # one process: the model is whole, not sharded
    return step, rate
