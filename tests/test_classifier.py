"""Sharded margin softmax against a single-process full softmax, on 1, 2 and 3 gloo ranks.

The multi-process runs happen once per world size (module fixture): every worker runs all the
cases of its world size and saves its loss and gradients; the tests then compare the
concatenated shards with the reference computed here. The 3-rank run also reloads the
checkpoint written by the 2-rank run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from oclear_ray import parallel
from oclear_ray.classifier import ClassifierConfig, ShardedMarginSoftmax
from oclear_ray.config import HeadConfig
from tests.helpers import free_port, gloo_rank

DIM = 16
# name -> (world size, num classes, local batch sizes, margin, sample rate)
CASES = {
    "cos_7_on_2": (2, 7, [5, 3], "cosface", 1.0),
    "arc_7_on_2": (2, 7, [5, 3], "arcface", 1.0),
    "rate_0.9_covers_shards": (2, 7, [5, 3], "cosface", 0.9),
    "no_labels": (2, 7, [2, 2], "cosface", 1.0),
    "sampled_0.25": (2, 40, [6, 6], "cosface", 0.25),
    "sampled_few_slots": (2, 40, [8, 8], "arcface", 0.1),
    "cos_10_on_3": (3, 10, [4, 0, 3], "cosface", 1.0),
    "arc_10_on_3": (3, 10, [4, 0, 3], "arcface", 1.0),
    "cos_4_on_3_empty_shard": (3, 4, [3, 3, 2], "cosface", 1.0),
    "arc_4_on_3_empty_shard": (3, 4, [3, 3, 2], "arcface", 1.0),
    "sampled_4_on_3": (3, 4, [3, 3, 2], "cosface", 0.5),
}
CKPT_CLASSES = 10


def make_case(name: str) -> dict:
    """Deterministic inputs of a case: full embeddings, labels (some -1) and centres."""
    world, num_classes, sizes, margin, rate = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    batch = sum(sizes)
    weight = torch.randn(num_classes, DIM, generator=gen) * 0.01
    emb = torch.randn(batch, DIM, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    if name == "sampled_0.25":
        labels = labels % 3 * 13  # classes 0, 13 | 26: most kept centres are random negatives
    if name == "sampled_few_slots":
        labels = torch.arange(batch) % 10 * 4  # more positives on each shard than 2 slots
    labels[3::4] = -1
    if name == "no_labels":
        labels[:] = -1
    if margin == "arcface":  # row 1 past theta + m > pi: the linear continuation
        emb[1] = -0.95 * weight[labels[1]] / weight[labels[1]].norm() + 0.01 * emb[1]
    config = ClassifierConfig(num_classes=num_classes, dim=DIM, margin=margin, sample_rate=rate)
    return dict(config=config, sizes=sizes, emb=emb, labels=labels, weight=weight)


def reference(case: dict, columns: torch.Tensor | None = None) -> dict:
    """Full softmax loss and gradients in one process; ``columns`` restricts the classes."""
    cfg = case["config"]
    emb = case["emb"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    labels = case["labels"]
    w = weight if columns is None else weight[columns]
    cos = F.normalize(emb, dim=1) @ F.normalize(w, dim=1).T
    keep = labels >= 0
    cos, y = cos[keep], labels[keep]
    if columns is not None:
        y = torch.searchsorted(columns, y)
    pos = cos.gather(1, y[:, None]).squeeze(1)
    if cfg.margin == "arcface":
        theta = torch.acos(pos.clamp(-1 + 1e-7, 1 - 1e-7))
        linear = pos - cfg.m * math.sin(cfg.m)
        phi = torch.where(pos > -math.cos(cfg.m), torch.cos(theta + cfg.m), linear)
    else:
        phi = pos - cfg.m
    logits = cos.scatter(1, y[:, None], phi[:, None]) * cfg.scale
    loss = F.cross_entropy(logits, y) if y.numel() else cos.sum() * 0.0
    loss.backward()
    return dict(loss=loss.detach(), emb_grad=emb.grad, weight_grad=weight.grad)


def run_case(case: dict, rank: int, world: int) -> dict:
    """This rank's loss and gradients for ``case``."""
    clf = ShardedMarginSoftmax(case["config"])
    with torch.no_grad():
        clf.weight.copy_(case["weight"][clf.start : clf.stop])
    offset = sum(case["sizes"][:rank])
    rows = slice(offset, offset + case["sizes"][rank])
    emb = case["emb"][rows].clone().requires_grad_()
    loss = clf(emb, case["labels"][rows])
    loss.backward()
    return dict(loss=loss.detach(), emb_grad=emb.grad, weight_grad=clf.weight.grad)


@torch.no_grad()
def full_logits(clf: ShardedMarginSoftmax, emb: torch.Tensor) -> torch.Tensor:
    return parallel.all_gather_rows(clf.logits(emb).T.contiguous(), clf.group).T


def checkpoint_step(rank: int, world: int, path: str) -> dict:
    """World 2 saves a head with DCP; world 3 loads it into a differently seeded head."""
    torch.manual_seed(1000 * world + rank)
    clf = ShardedMarginSoftmax(ClassifierConfig(num_classes=CKPT_CLASSES, dim=DIM))
    if world == 2:
        dcp.save({"head": clf.state_dict()}, checkpoint_id=path)
    else:
        state = {"head": clf.state_dict()}
        dcp.load(state, checkpoint_id=path)
        clf.load_state_dict(state["head"])
    emb = torch.randn(5, DIM, generator=torch.Generator().manual_seed(7))
    return dict(logits=full_logits(clf, emb), weight=clf.full_weight())


def dtensor_rows(world: int) -> dict[int, tuple[int, int]]:
    """Rows DTensor's ``Shard(0)`` gives this rank, for a few row counts."""
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for rows in (1, 2, 4, 5, 7, 10):
        local = distribute_tensor(torch.arange(rows), mesh, [Shard(0)]).to_local()
        out[rows] = (int(local[0]), int(local[-1]) + 1) if local.numel() else None
    return out


def worker(rank: int, world: int, port: int, tmp: str) -> None:
    with gloo_rank(rank, world, port):
        cases = {name: make_case(name) for name, spec in CASES.items() if spec[0] == world}
        results = {name: run_case(case, rank, world) for name, case in cases.items()}
        results["checkpoint"] = checkpoint_step(rank, world, f"{tmp}/ckpt")
        results["dtensor_rows"] = dtensor_rows(world)
        torch.save(results, f"{tmp}/w{world}_r{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Per world size, the list of per-rank results (world 3 runs after world 2); the tmp dir."""
    tmp = str(tmp_path_factory.mktemp("dist"))
    out = {}
    for world in (2, 3):
        mp.spawn(worker, args=(world, free_port(), tmp), nprocs=world)
        out[world] = [torch.load(f"{tmp}/w{world}_r{r}.pt") for r in range(world)]
    out["tmp"] = tmp
    return out


def gathered(per_rank: list[dict], key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in per_rank])


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 relative, or 1e-5 of the tensor's largest entry (float32 sums cancel)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 0.1))


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("sampled")])
def test_sharded_equals_full_softmax(runs, name):
    per_rank = [r[name] for r in runs[CASES[name][0]]]
    expected = reference(make_case(name))
    for r in per_rank:
        assert torch.equal(r["loss"], per_rank[0]["loss"])  # same value on every rank
    assert_close(per_rank[0]["loss"], expected["loss"])
    assert_close(gathered(per_rank, "emb_grad"), expected["emb_grad"])
    assert_close(gathered(per_rank, "weight_grad"), expected["weight_grad"])


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("sampled")])
def test_sampling_keeps_positives_and_equals_softmax_over_sample(runs, name):
    world, num_classes, _, _, rate = CASES[name]
    case = make_case(name)
    per_rank = [r[name] for r in runs[world]]
    columns = []
    for rank, result in enumerate(per_rank):
        start, stop = parallel.shard_range(num_classes, rank, world)
        kept = result["weight_grad"].abs().sum(1).nonzero().squeeze(1) + start
        labels = case["labels"]
        positives = labels[(labels >= start) & (labels < stop)].unique()
        assert set(positives.tolist()) <= set(kept.tolist())
        assert len(kept) == max(math.ceil(rate * (stop - start)), len(positives))
        columns.append(kept)
    expected = reference(case, torch.cat(columns))
    assert_close(per_rank[0]["loss"], expected["loss"])
    assert_close(gathered(per_rank, "emb_grad"), expected["emb_grad"])
    assert_close(gathered(per_rank, "weight_grad"), expected["weight_grad"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_from_2_ranks_loads_on_3_and_1(runs):
    saved = runs[2][0]["checkpoint"]
    for loaded in [r["checkpoint"] for r in runs[3]]:  # the 3-rank heads started elsewhere
        assert torch.equal(loaded["weight"], saved["weight"])
        assert_close(loaded["logits"], saved["logits"])
    local = ShardedMarginSoftmax(ClassifierConfig(num_classes=CKPT_CLASSES, dim=DIM))
    state = {"head": local.state_dict()}
    dcp.load(state, checkpoint_id=f"{runs['tmp']}/ckpt", no_dist=True)
    local.load_state_dict(state["head"])
    assert torch.equal(local.weight.detach(), saved["weight"])


@pytest.mark.parametrize("world", [2, 3])
def test_shard_range_matches_dtensor(runs, world):
    for rank, result in enumerate(runs[world]):
        for rows, got in result["dtensor_rows"].items():
            start, stop = parallel.shard_range(rows, rank, world)
            assert got == ((start, stop) if stop > start else None)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_range_covers_rows_like_torch_chunk(world):
    for rows in range(0, 30):
        ranges = [parallel.shard_range(rows, r, world) for r in range(world)]
        sizes = [len(c) for c in torch.arange(rows).chunk(world)] if rows else []
        assert [b - a for a, b in ranges] == sizes + [0] * (world - len(sizes))
        assert torch.equal(torch.cat([torch.arange(a, b) for a, b in ranges]), torch.arange(rows))


@pytest.mark.parametrize(
    "args, message",
    [((10, 3, 3), "rank must be in"), ((10, 0, 0), "world_size must be >= 1, got 0")],
)
def test_shard_range_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        parallel.shard_range(*args)


def test_config_defaults():
    default = ClassifierConfig(num_classes=3, dim=2)
    assert (default.m, default.scale) == (0.2, 32.0)
    assert ClassifierConfig(num_classes=3, dim=2, margin="arcface").m == 0.5
    # one set of settings and defaults: a training config's head is a classifier's margin
    head = HeadConfig(margin="arcface", sample_rate=0.1)
    made = ClassifierConfig.of(head, num_classes=3, dim=2)
    assert (made.margin, made.m, made.scale, made.sample_rate) == ("arcface", 0.5, 32.0, 0.1)
    assert ClassifierConfig.of(HeadConfig(), num_classes=3, dim=2) == default


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=0), r"num_classes must be an integer >= 1, got 0"),
        (dict(dim=2.5), r"dim must be an integer >= 1, got 2.5"),
        (dict(margin="sphereface"), r"margin must be one of .* got 'sphereface'"),
        (dict(margin="arcface", m=2.0), r"m must be in \[0, 1.5708\) for arcface, got 2.0"),
        (dict(m=-0.1), r"m must be in \[0, 1\) for cosface, got -0.1"),
        (dict(scale=0.0), r"ClassifierConfig.scale must be > 0, got 0.0"),
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\], got 0.0"),
        (dict(sample_rate=1.5), r"sample_rate must be in \(0, 1\], got 1.5"),
    ],
)
def test_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierConfig(**{"num_classes": 3, "dim": 2, **kwargs})


def local_case(margin: str, rate: float = 1.0) -> tuple[dict, ShardedMarginSoftmax]:
    """A 50-class case in one process (no process group) and a head loaded with its centres."""
    gen = torch.Generator().manual_seed(3)
    config = ClassifierConfig(num_classes=50, dim=DIM, margin=margin, sample_rate=rate)
    labels = torch.tensor([4, 4, 17, -1, 30, 4])
    case = dict(config=config, emb=torch.randn(6, DIM, generator=gen), labels=labels)
    case["weight"] = torch.randn(50, DIM, generator=gen)
    clf = ShardedMarginSoftmax(config)
    clf.load_state_dict({"weight": case["weight"]})  # a full plain matrix also loads
    return case, clf


@pytest.mark.parametrize("margin", ["cosface", "arcface"])
def test_single_process_equals_full_softmax(margin):
    case, clf = local_case(margin)
    assert clf.group is None and isinstance(clf.state_dict()["weight"], torch.Tensor)
    emb = case["emb"].clone().requires_grad_()
    loss = clf(emb, case["labels"])
    loss.backward()
    expected = reference(case)
    assert_close(loss.detach(), expected["loss"])
    assert_close(emb.grad, expected["emb_grad"])
    assert_close(clf.weight.grad, expected["weight_grad"])


def test_single_process_sampling_keeps_positives_and_eval_does_not_sample():
    case, clf = local_case("cosface", rate=0.1)
    emb = case["emb"].clone().requires_grad_()
    clf(emb, case["labels"]).backward()
    kept = clf.weight.grad.abs().sum(1).nonzero().squeeze(1)
    assert len(kept) == 5 and {4, 17, 30} <= set(kept.tolist())
    clf.eval()
    assert_close(clf(case["emb"], case["labels"]), reference(case)["loss"])


def test_bfloat16_embeddings_use_float32_softmax():
    case, clf = local_case("arcface")
    emb = case["emb"].bfloat16().requires_grad_()
    loss = clf(emb, case["labels"])
    loss.backward()
    assert loss.dtype == torch.float32 and emb.grad.dtype == torch.bfloat16
    expected = reference(case | {"emb": emb.detach().float()})
    assert_close(loss.detach(), expected["loss"])


def test_bad_inputs_raise():
    case, clf = local_case("cosface")
    with pytest.raises(ValueError, match=r"labels must be -1 or in \[0, 50\), got \[50\]"):
        clf(case["emb"][:1], torch.tensor([50]))
    with pytest.raises(ValueError, match=r"embeddings must be \[batch, 16\], got \(2, 3\)"):
        clf(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))
    loss = clf(case["emb"].requires_grad_(), case["labels"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_resolve_world_without_process_group():
    assert parallel.resolve_world() == (0, 1, None)
    with pytest.raises(ValueError, match="world_size=2 needs torch.distributed"):
        parallel.resolve_world(world_size=2)
    with pytest.raises(ValueError, match="rank must be 0 in a world of size 1, got 1"):
        parallel.resolve_world(rank=1)
