"""Every torch.distributed call of oclear-ray, so that models never import it.

Ranks, world sizes and process groups are passed in explicitly; a world of size 1 (including
"torch.distributed not initialised") takes a local path with no communication. Row-sharded
tensors follow DTensor's ``Shard(0)`` layout so they can be checkpointed with
``torch.distributed.checkpoint`` and resharded to another world size on load.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

ProcessGroup = dist.ProcessGroup


def shard_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` owned by ``rank``: DTensor ``Shard(0)`` / ``torch.chunk`` layout.

    Every rank gets ``ceil(num_rows / world_size)`` rows except the last ones, which may get
    fewer or none (10 rows on 4 ranks: 3, 3, 3, 1; 4 rows on 3 ranks: 2, 2, 0).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    chunk = math.ceil(num_rows / world_size)
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def resolve_world(
    rank: int | None = None, world_size: int | None = None, group: ProcessGroup | None = None
) -> tuple[int, int, ProcessGroup | None]:
    """Resolve ``(rank, world_size, group)``; the group is None for a world of size 1.

    Missing values come from ``group`` (default: the whole world) when torch.distributed is
    initialised, else from the local world of size 1. ``world_size=1`` forces the local path
    even inside a larger job (e.g. a replicated module under DDP); other explicit values must
    agree with the group.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if world_size == 1 or (world_size is None and not initialised):
        if rank not in (None, 0):
            raise ValueError(f"rank must be 0 in a world of size 1, got {rank}")
        return 0, 1, None
    if not initialised:
        raise ValueError(f"world_size={world_size} needs torch.distributed to be initialised")
    group = group if group is not None else dist.group.WORLD
    actual = (dist.get_rank(group), dist.get_world_size(group))
    if rank not in (None, actual[0]) or world_size not in (None, actual[1]):
        raise ValueError(
            f"rank={rank}, world_size={world_size} disagree with the process group "
            f"(rank {actual[0]} of {actual[1]})"
        )
    return actual[0], actual[1], None if actual[1] == 1 else group


def all_reduce_sum_(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place (no-op without a group)."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Elementwise maximum of ``tensor`` over the ranks of ``group`` in place."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_gather_rows(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate the rows of ``tensor`` from every rank in rank order, with gradient.

    Ranks may hold different numbers of rows (including none). The gradient of a rank's rows
    is the sum over ranks of the gradient of the gathered tensor: each rank's loss term only
    sees part of the computation (e.g. its own slice of the classes). Every rank of the group
    must call this the same number of times, and run the backward pass if one does.
    """
    if group is None:
        return tensor
    return _AllGatherRows.apply(tensor, group)


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        sizes = _gather_sizes(tensor.shape[0], tensor.device, group)
        ctx.sizes, ctx.rank, ctx.group = sizes, dist.get_rank(group), group
        longest = max(sizes)
        padded = tensor.contiguous()
        if tensor.shape[0] < longest:
            padded = torch.cat(
                [padded, tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])]
            )
        out = tensor.new_empty(len(sizes) * longest, *tensor.shape[1:])
        dist.all_gather_single(out, padded, group=group)
        if all(size == longest for size in sizes):
            return out
        return torch.cat([out[r * longest : r * longest + n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Each rank's rows of the gradient summed over ranks: one reduce-scatter of the
        gradient laid out as the forward's padded gather (not an all-reduce of all of it)."""
        sizes, longest = ctx.sizes, max(ctx.sizes)
        parts = grad.split(sizes)
        padded = torch.cat(
            [torch.cat([p, p.new_zeros(longest - len(p), *p.shape[1:])]) for p in parts]
        )
        out = grad.new_empty(longest, *grad.shape[1:])
        dist.reduce_scatter_single(out, padded.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out[: sizes[ctx.rank]], None


def _gather_sizes(rows: int, device: torch.device, group: ProcessGroup) -> list[int]:
    sizes = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    dist.all_gather_single(sizes, torch.tensor([rows], dtype=torch.int64, device=device), group)
    return sizes.tolist()


def to_row_sharded(
    local: torch.Tensor, num_rows: int, group: ProcessGroup | None
) -> torch.Tensor | DTensor:
    """Wrap this rank's rows as a ``Shard(0)`` DTensor of ``num_rows`` rows over ``group``.

    Without a group the tensor is returned as is. Saving plain per-rank tensors under one key
    with torch.distributed.checkpoint would keep one rank's copy; a DTensor keeps all shards
    and reshards them to the reader's world size.
    """
    if group is None:
        return local
    mesh = DeviceMesh.from_group(group, local.device.type)
    shape = torch.Size((num_rows, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def from_row_sharded(value: torch.Tensor, num_rows: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``value``: a ``Shard(0)`` DTensor or a full plain tensor."""
    if isinstance(value, DTensor):
        if tuple(value.placements) != (Shard(0),):
            raise ValueError(f"expected a Shard(0) DTensor, got placements {value.placements}")
        local = value.to_local()
    elif value.shape[0] == num_rows:
        local = value[start:stop]
    else:
        raise ValueError(f"expected {num_rows} rows, got a tensor of shape {tuple(value.shape)}")
    if local.shape[0] != stop - start:
        raise ValueError(
            f"shard holds {local.shape[0]} rows, expected rows [{start}, {stop}) of {num_rows}"
        )
    return local


def max_over_ranks(value: float, group: ProcessGroup | None = None) -> float:
    """The largest of every rank's ``value`` (the same float on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return float(value)
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return float(tensor.item())


def apply_fsdp(model: torch.nn.Module, units: list[torch.nn.Module], mp_policy=None) -> None:
    """Shard ``model`` with FSDP2 over the whole world: each unit, then the root (its
    ``forward`` gathers the parameters; call it, not another method). The mesh's device type
    follows the parameters (CPU: gloo). ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy`` for
    every unit (None: full precision).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)


def apply_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` replicated with DDP over the whole world: its gradients averaged in a few
    bucketed all-reduces that overlap the backward pass, where FSDP2 gathers and scatters every
    unit (``bench/parallel.py``: 1.10x FSDP2's samples/s for the CPU default on 2 gloo ranks).
    A stage may leave parts unused (the text tower while aligning images); batch-norm
    statistics stay per rank, as under FSDP2. Call the returned module (its ``forward``)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
        forward_sync_buffers=False,
    )
