"""Cross-rank communication: the one set of helpers the losses, data loading and evaluation use.

Every function takes ``world_size`` explicitly and is a no-op (or a plain local operation)
when it is 1, so everything runs on one device with no process group at all.

* :func:`all_gather_with_grad` — concatenates every rank's rows; the backward sends each
  rank the summed gradient of its own rows, so W ranks with B samples each give exactly
  the gradients of one process on W*B samples (after the usual DDP average).
* :func:`all_gather_no_grad` — LAVIS's ``concat_all_gather``: the gathered tensor carries
  no gradient, not even for the local rows.
* :func:`gather_rows` — fetches chosen rows (by global index) from whichever rank owns
  them, with gradient, moving only those rows (used for ITM hard negatives).
* :func:`gather_objects` / :func:`gather_dict` — small Python objects (reports, predictions).
* :func:`all_gather_uneven` / :func:`broadcast_` — evaluation's score slices and candidate sets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_dist(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` / ``world_size`` as given, else the process group's; checked for consistency."""
    default_rank, default_world = dist_info()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed process group")
    return rank, world_size


def gather_objects(obj: Any, *, world_size: int) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one process."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def gather_dict(part: dict[Any, Any], *, world_size: int) -> dict[Any, Any]:
    """Merge every rank's ``{id: value}``; the identity on one process."""
    if world_size == 1:
        return part
    return {k: v for p in gather_objects(part, world_size=world_size) for k, v in p.items()}


def broadcast_(tensor: torch.Tensor, *, src: int = 0, world_size: int) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s (in place); no-op on one process."""
    if world_size > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_uneven(local: torch.Tensor, sizes: list[int], *, world_size: int) -> torch.Tensor:
    """Concatenate every rank's 1-D ``local`` whose lengths are ``sizes`` (known to all ranks)."""
    if world_size == 1:
        return local
    padded = local.new_zeros(max(sizes))
    padded[: local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.world_size, ctx.rows = rank, world_size, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Every rank holds d(its loss)/d(all rows); the gradient of rank r's rows is the
        # sum over ranks of the slice that belongs to r.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None, None


def all_gather_with_grad(x: torch.Tensor, *, rank: int, world_size: int) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...), rank-major, differentiable for every rank."""
    if world_size == 1:
        return x
    return _AllGather.apply(x, rank, world_size)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, *, world_size: int) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) without gradient (LAVIS's ``concat_all_gather``)."""
    if world_size == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.out_splits, ctx.in_splits = out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits)
        return out, None, None


def gather_rows(local: torch.Tensor, index: torch.Tensor, *, rank: int, world_size: int) -> torch.Tensor:
    """Rows ``index`` (global, rank-major over equal local batches) of the tensor whose
    rank-``r`` shard is ``local`` (B, ...) on rank ``r``. Returns (len(index), ...).

    Only the requested rows cross ranks, and gradients flow back to their owners. On one
    process this is ``local[index]``. Every rank must call it (it is a collective).
    """
    if world_size == 1:
        return local[index]
    b = local.shape[0]
    # Everyone learns every rank's requests (a few integers).
    requests = [torch.empty_like(index) for _ in range(world_size)]
    dist.all_gather(requests, index.contiguous())
    owner = [req // b for req in requests]
    # What this rank serves to each requester, in the requester's order.
    serve = torch.cat([requests[s][owner[s] == rank] - rank * b for s in range(world_size)])
    in_splits = [int((owner[s] == rank).sum()) for s in range(world_size)]
    my_owner = owner[rank]
    out_splits = [int((my_owner == s).sum()) for s in range(world_size)]
    received = _AllToAll.apply(local[serve], out_splits, in_splits)  # grouped by source rank
    # received[k] answers request number order[k] (a stable sort by owner is the order
    # in which the rows arrive); invert that permutation to restore the request order.
    order = torch.sort(my_owner, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return received[inverse]


@torch.no_grad()
def all_reduce_max(value: int, *, world_size: int, device: torch.device | str = "cpu") -> int:
    """The maximum of an integer over ranks."""
    if world_size == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
