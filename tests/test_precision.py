"""Mixed precision: one bf16-autocast training step against the same step in float32, on 1 gloo
rank and on 2 (FSDP2-sharded encoders, sharded classifier), and the FSDP2 policy for GPUs.

Tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op). The loss stays within
1 % of float32; gradients lose more on their way back through the layers (measured on this
random-init model: median 5 % relative per tensor, up to 33 % at the stem's batch norm, 13 % for
the whole model), so the whole model's gradient must be within 25 % in L2 and every tensor's
gradient point the same way (cosine >= 0.9). Without the float32 softmax the step does not run
at all (the classifier's backward mixes dtypes).
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from oclear_ray import parallel
from oclear_ray.classifier import ClassifierConfig, ShardedMarginSoftmax
from oclear_ray.config import TrainConfig
from oclear_ray.model import RetrievalModel
from oclear_ray.train import Batch, autocast, mixed_precision_policy, train_step
from tests.helpers import free_port, gloo_rank
from tests.tiny import TINY_MODEL

LOSS_RTOL, GRAD_RTOL, MIN_COSINE = 0.01, 0.25, 0.9
CLASSES, B, Q, T = 12, 8, 4, 6


def config(precision: str) -> TrainConfig:
    text = {**TINY_MODEL["text"], "vocab_size": 40, "dropout": 0.0}  # no dropout: same passes
    model = {**TINY_MODEL, "text": text, "fusion": {**TINY_MODEL["fusion"], "dropout": 0.0}}
    return TrainConfig.from_dict({"model": model, "run": {"precision": precision}})


def fixed_batch(rank: int) -> Batch:
    gen = torch.Generator().manual_seed(100 + rank)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1] = 0
    mask[2, 3:] = 0
    return Batch(
        doc_images=torch.randn(B, 3, 32, 32, generator=gen),
        doc_ids=torch.randint(5, 40, (B, T), generator=gen) * mask,
        doc_mask=mask,
        doc_labels=torch.randint(0, CLASSES, (B,), generator=gen),
        query_images=torch.randn(Q, 3, 32, 32, generator=gen),
        query_labels=torch.randint(0, CLASSES, (Q,), generator=gen),
    )


def _grads(model, head) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in [
        *model.named_parameters(),
        *(("head." + n, p) for n, p in head.named_parameters()),
    ]:
        if p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).float().clone()
    return out


def compare_precisions(rank: int = 0, world: int = 1) -> dict:
    """Loss and gradients of one fuse step in fp32 and in bf16 on this rank's fixed batch."""
    torch.manual_seed(0)
    model = RetrievalModel(config("fp32").model)
    head = ShardedMarginSoftmax(ClassifierConfig(num_classes=CLASSES, dim=32, scale=32.0, m=0.2))
    if world > 1:
        parallel.apply_fsdp(model, model.shard_units())
    batch, device = fixed_batch(rank), torch.device("cpu")
    out = {}
    for precision in ("fp32", "bf16"):
        with autocast(config(precision), device):
            loss = train_step(model, head, batch, towers="all")
        loss.backward()
        out[precision] = {"loss": loss.detach().clone(), "grads": _grads(model, head)}
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
    return out


def errors(result: dict) -> dict:
    """Relative loss error, relative L2 error of all gradients, smallest per-tensor cosine."""
    full, half = result["fp32"], result["bf16"]
    names = sorted(full["grads"])
    assert names == sorted(half["grads"]) and len(names) > 20
    g32 = torch.cat([full["grads"][n].flatten() for n in names])
    g16 = torch.cat([half["grads"][n].flatten() for n in names])
    cosines = {
        n: float(
            torch.nn.functional.cosine_similarity(
                full["grads"][n].flatten(), half["grads"][n].flatten(), dim=0
            )
        )
        for n in names
        if full["grads"][n].norm() > 1e-6 * g32.norm()
    }
    return {
        "loss": float((half["loss"] - full["loss"]).abs() / full["loss"].abs()),
        "grad": float((g16 - g32).norm() / g32.norm()),
        "min_cosine": min(cosines.values()),
        "worst": min(cosines, key=cosines.get),
        "loss_dtype": half["loss"].dtype,
    }


def _worker(rank: int, world: int, port: int, path: str) -> None:
    with gloo_rank(rank, world, port):
        torch.save(errors(compare_precisions(rank, world)), f"{path}/r{rank}.pt")


def _check(err: dict) -> None:
    assert err["loss_dtype"] == torch.float32
    assert err["loss"] < LOSS_RTOL, err
    assert err["grad"] < GRAD_RTOL, err
    assert err["min_cosine"] > MIN_COSINE, err


def test_bf16_step_matches_float32_on_one_rank():
    _check(errors(compare_precisions()))


def test_bf16_step_matches_float32_on_two_gloo_ranks_with_fsdp(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        _check(torch.load(tmp_path / f"r{rank}.pt"))


def test_fsdp_gets_a_bf16_policy_on_gpu_only():
    policy = mixed_precision_policy(config("bf16"), torch.device("cuda"))
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision_policy(config("bf16"), torch.device("cpu")) is None
    assert mixed_precision_policy(config("fp32"), torch.device("cuda")) is None


def _one_step(rank: int, world: int, port: int, path: str) -> None:
    """One fuse step from the same start on each rank's own batch, replicated (DDP) and
    sharded (FSDP2): the full weights after it as the export gathers them (rank 0's), and
    DDP's local replica."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from oclear_ray.train import _build

    with gloo_rank(rank, world, port):
        out = {}
        for fsdp in (True, False):
            cfg = config("fp32")
            cfg.run.fsdp, cfg.run.workers = fsdp, world
            model, head, optim, head_optim = _build(cfg, CLASSES, torch.device("cpu"))
            train_step(model, head, fixed_batch(rank), towers="all").backward()
            optim.step(), head_optim.step()
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            out[fsdp] = get_model_state_dict(model, options=options)  # rank 0's: the export's
            if not fsdp:
                out["replica"] = model.module.state_dict()
        torch.save(out, f"{path}/step{rank}.pt")


def test_ddp_and_fsdp_take_the_same_step_on_two_gloo_ranks(tmp_path):
    """``run.fsdp: false`` replicates the encoders with DDP: the same averaged gradient as
    FSDP2's, so the same weights on every rank, under the plain model's names (the export)."""
    mp.spawn(_one_step, args=(2, free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"step{r}.pt") for r in range(2))
    torch.manual_seed(config("fp32").run.seed)  # the start ``_build`` gives every rank
    plain = RetrievalModel(config("fp32").model)
    start, params = plain.state_dict(), {n for n, _ in plain.named_parameters()}
    names = set(start)
    assert set(r0[False]) == set(r0[True]) == names
    moved = [n for n in params if not torch.equal(r0[False][n], start[n])]
    assert len(moved) > 20  # the step changed the encoders
    for n in names:  # batch-norm statistics stay each rank's own, as under FSDP2
        assert n not in params or torch.equal(r0[False][n], r1["replica"][n]), n
        assert torch.allclose(r0[False][n], r0[True][n], atol=1e-6), n
