"""Margin-softmax classifier whose class centres are sharded across ranks (Partial FC style).

Each rank owns a contiguous slice of the class centres (DTensor ``Shard(0)`` layout, see
``parallel.shard_range``). A step all-gathers the embeddings and labels of the whole batch,
computes cosine logits against the local centres, puts a margin on the positive logit
(CosFace ``cos - m`` or ArcFace ``cos(theta + m)``), scales them by ``scale`` and forms the softmax
across ranks from an all-reduce of the row maxima and one of the row sums. The loss is the mean
cross-entropy over the labelled rows of the global batch, the same value on every rank.
Optionally each rank keeps only a random subset of its negative centres per step (Partial FC).

Query and document embeddings of one class share its centre: pass both through ``forward``
with their labels. All communication goes through ``oclear_ray.parallel``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from oclear_ray import parallel
from oclear_ray.config import MarginConfig

# ArcFace's d cos(theta + m) / d cos grows like 1 / sin(theta); cap it where sin(theta) < 1e-3.
_MIN_SIN_SQUARED = 1e-6


@dataclass(kw_only=True)
class ClassifierConfig(MarginConfig):
    """A classifier: its margin softmax (``config.MarginConfig``, the same settings and
    defaults as a training config's ``head``) and its size."""

    num_classes: int
    dim: int
    where: ClassVar[str] = "ClassifierConfig"

    def __post_init__(self) -> None:
        for name in ("num_classes", "dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ClassifierConfig.{name} must be an integer >= 1, got {value!r}")
        super().__post_init__()

    @classmethod
    def of(cls, head: MarginConfig, *, num_classes: int, dim: int) -> ClassifierConfig:
        """A training config's ``head`` for ``num_classes`` centres of ``dim``."""
        margin = {f.name: getattr(head, f.name) for f in dataclasses.fields(MarginConfig)}
        return cls(**margin, num_classes=num_classes, dim=dim)


class ShardedMarginSoftmax(nn.Module):
    """Margin-softmax cross-entropy over class centres split across the ranks of ``group``.

    ``weight`` holds this rank's centres, rows ``[start, stop)`` of the ``num_classes`` x
    ``dim`` matrix. ``state_dict()`` returns it as a ``Shard(0)`` DTensor (when the world is
    larger than 1) so that a torch.distributed.checkpoint taken with W ranks loads with W';
    ``load_state_dict`` accepts that DTensor or the full matrix.
    """

    def __init__(
        self,
        config: ClassifierConfig,
        rank: int | None = None,
        world_size: int | None = None,
        group: parallel.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.rank, self.world_size, self.group = parallel.resolve_world(rank, world_size, group)
        self.start, self.stop = parallel.shard_range(config.num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, config.dim))
        nn.init.normal_(self.weight, std=0.01)
        self.register_state_dict_post_hook(_shard_state_dict)
        self.register_load_state_dict_pre_hook(_unshard_state_dict)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the labelled rows of the global batch (0 if none are labelled).

        ``embeddings`` [B_local, dim] are L2-normalised here (callers need not) and cast to
        the centres' dtype (e.g. bf16 encoder outputs, float32 softmax, with autocast off
        inside); ``labels`` [B_local] are global class ids, -1 for "no label" (the row is
        ignored). Local batch sizes may differ between ranks.
        """
        self._check_inputs(embeddings, labels)
        # the softmax stays in the centres' dtype (float32) whatever the caller's autocast:
        # bf16 logits over many classes lose the loss, and the backward mixes saved dtypes
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._loss(embeddings.to(self.weight.dtype), labels)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(embeddings, dim=1)
        emb = parallel.all_gather_rows(emb, self.group)
        labels = parallel.all_gather_rows(labels.long(), self.group)
        bad = (labels < -1) | (labels >= self.config.num_classes)
        if bad.any():
            raise ValueError(
                f"labels must be -1 or in [0, {self.config.num_classes}), "
                f"got {labels[bad][:5].tolist()}"
            )
        labelled = labels >= 0
        emb, labels = emb[labelled], labels[labelled]
        owned = (labels >= self.start) & (labels < self.stop)
        targets = torch.where(owned, labels - self.start, -1)
        weight, targets = self._sample(targets)
        return _MarginCrossEntropy.apply(emb, weight, targets, self.config, self.group)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [B, stop - start] to this rank's centres (no margin, no scale)."""
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """All ``num_classes`` centres on every rank (one all-gather), e.g. for evaluation."""
        return parallel.all_gather_rows(self.weight.detach(), self.group)

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.dim:
            raise ValueError(
                f"embeddings must be [batch, {self.config.dim}], got {tuple(embeddings.shape)}"
            )
        if labels.shape != embeddings.shape[:1] or labels.is_floating_point():
            raise ValueError(
                f"labels must be integer class ids of shape [{embeddings.shape[0]}], "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )

    def _sample(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial FC: this rank's positives plus random negatives, ``ceil(rate * shard)`` rows.

        Returns the kept centres and the targets renumbered into them. Only in training mode;
        when the sample would cover the whole shard, the shard is used as is. Negatives are
        drawn from torch's default generator.
        """
        shard = self.weight.shape[0]
        keep = math.ceil(self.config.sample_rate * shard)
        if not self.training or keep >= shard:
            return self.weight, targets
        positives = torch.unique(targets[targets >= 0])
        if positives.numel() >= keep:
            index = positives
        else:
            score = torch.rand(shard, device=self.weight.device)
            score[positives] = 2.0  # above any uniform draw: positives are always kept
            index = torch.topk(score, keep, sorted=False).indices.sort().values
        has_target = targets >= 0
        targets = targets.clone()
        targets[has_target] = torch.searchsorted(index, targets[has_target])
        return self.weight.index_select(0, index), targets


def _shard_state_dict(module: ShardedMarginSoftmax, state_dict, prefix: str, _metadata) -> None:
    key = prefix + "weight"
    state_dict[key] = parallel.to_row_sharded(
        state_dict[key], module.config.num_classes, module.group
    )


def _unshard_state_dict(module: ShardedMarginSoftmax, state_dict, prefix: str, *_args) -> None:
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = parallel.from_row_sharded(
            state_dict[key], module.config.num_classes, module.start, module.stop
        )


def _margin(cos: torch.Tensor, config: ClassifierConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive logits with the margin, and their derivative with respect to ``cos``.

    ArcFace past ``theta + m > pi`` continues as ``cos - m sin(m)`` (insightface's
    ``easy_margin=False``), which keeps the logit decreasing in theta.
    """
    if config.margin == "cosface":
        return cos - config.m, torch.ones_like(cos)
    cos_m, sin_m = math.cos(config.m), math.sin(config.m)
    sin_squared = 1.0 - cos * cos
    phi = cos * cos_m - sin_squared.clamp_min(0.0).sqrt() * sin_m
    dphi = cos_m + sin_m * cos / sin_squared.clamp_min(_MIN_SIN_SQUARED).sqrt()
    linear = cos <= -cos_m  # theta >= pi - m
    return torch.where(linear, cos - config.m * sin_m, phi), torch.where(linear, 1.0, dphi)


def _row_max(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 0:  # this rank owns (or sampled) no class
        return logits.new_full(logits.shape[:1], -math.inf)
    return logits.amax(dim=1)


class _MarginCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the scaled margin logits, softmax taken across ranks.

    Hand-written because the [B, n_local] logits dominate time and memory: one buffer holds
    the logits, then their exponentials (saved for backward), then the gradient; the scale,
    the softmax normaliser and the centre normalisation are folded into the small [B, D] and
    [n, D] operands instead of extra passes over that buffer.
    """

    @staticmethod
    def forward(ctx, emb, weight, targets, config: ClassifierConfig, group):
        """``emb`` [B, D] has unit rows; ``weight`` [n, D] is normalised here; ``targets`` [B]
        is the local column of each row's class, -1 if the class lives on another rank."""
        inv_norm = weight.norm(dim=1).clamp_min(1e-12).reciprocal()
        unit_weight = weight * inv_norm[:, None]
        logits = (emb * config.scale) @ unit_weight.T
        rows = torch.nonzero(targets >= 0).squeeze(1)
        cols = targets[rows]
        phi, dphi = _margin((logits[rows, cols] / config.scale).clamp(-1.0, 1.0), config)
        logits[rows, cols] = phi * config.scale
        row_max = parallel.all_reduce_max_(_row_max(logits), group)
        exps = logits.sub_(row_max[:, None]).exp_()
        sums = logits.new_zeros(2, logits.shape[0])  # sum of exps, positive logit - row max
        sums[0] = exps.sum(dim=1)
        sums[1, rows] = phi * config.scale - row_max[rows]
        parallel.all_reduce_sum_(sums, group)
        ctx.save_for_backward(emb, unit_weight, inv_norm, exps, sums[0], rows, cols, dphi)
        ctx.scale = config.scale / max(logits.shape[0], 1)
        ctx.spent = False
        return (sums[0].log() - sums[1]).sum() / max(logits.shape[0], 1)

    @staticmethod
    def backward(ctx, grad_loss):
        """d loss / d logits = (softmax - onehot) / B; the softmax is exps / sums per row."""
        if ctx.spent:
            raise RuntimeError("ShardedMarginSoftmax does not support a second backward pass")
        ctx.spent = True
        emb, unit_weight, inv_norm, exps, sums, rows, cols, dphi = ctx.saved_tensors
        exps[rows, cols] = (exps[rows, cols] - sums[rows]) * dphi  # the buffer is reused
        row_scale = (grad_loss * ctx.scale / sums)[:, None]
        grad_emb = (exps @ unit_weight) * row_scale
        grad_unit = exps.T @ (emb * row_scale)
        # Through w / |w|: remove the radial part, divide by the norm.
        radial = (grad_unit * unit_weight).sum(dim=1, keepdim=True)
        grad_weight = grad_unit.addcmul_(unit_weight, radial, value=-1.0).mul_(inv_norm[:, None])
        return grad_emb, grad_weight, None, None, None
