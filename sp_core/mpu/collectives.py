"""Collectives on dim 0 over a context's TP group.

Each call takes the ``ParallelContext`` of the model it serves, as Megatron's calls take a process group.
The sums and gathers travel by the context's route (``sp_core.mpu.routes``: torch.distributed, the
framework's communicator, or the deterministic mode's rank-order sums), the GEMMs fused with a gather or
a reduce-scatter by its async-TP form (``sp_core.mpu.async_tp``); both are chosen when the context is
made, so nothing here branches on either. The rest (max all-reduce, all-to-all, gather to one rank,
broadcast, barrier) is plain torch.distributed. Every call goes through ``door``.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.distributed as dist

from sp_core.mpu.door import Pending, check_divisible, global_rank, issued

def all_reduce(parallel, x: torch.Tensor, op: str = "sum", in_place: bool = False) -> torch.Tensor:
    """Sum (or max) over TP, in a new tensor; with ``in_place``, into a contiguous ``x`` itself where the
    route allows (for a partial result that the caller owns and drops: no copy). Use the returned tensor."""
    return x if parallel.size == 1 else parallel.route.all_reduce(x, op, in_place)


def all_gather(parallel, x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order)."""
    return x if parallel.size == 1 else parallel.route.all_gather(x)


def reduce_scatter(parallel, x: torch.Tensor) -> torch.Tensor:
    """Sum over TP, then keep this rank's contiguous 1/t of dim 0."""
    return x if parallel.size == 1 else parallel.route.reduce_scatter(x)


def all_gather_start(parallel, x: torch.Tensor) -> Pending:
    """Start concatenating every rank's ``x`` along dim 0 (rank order); ``wait()`` gives the result."""
    return Pending(x) if parallel.size == 1 else parallel.route.all_gather_start(x)


def reduce_scatter_start(parallel, x: torch.Tensor) -> Pending:
    """Start summing over TP, keeping this rank's contiguous 1/t of dim 0."""
    return Pending(x) if parallel.size == 1 else parallel.route.reduce_scatter_start(x)


def all_gather_matmul(parallel, a_shard: torch.Tensor, b: torch.Tensor):
    """``(all_gather(a_shard), all_gather(a_shard) @ b)``, the gather fused with the GEMM where the
    context's async-TP policy says it pays: it is still g's forward (counted as one all_gather)."""
    if parallel.size == 1:
        return a_shard, a_shard @ b
    a_shard = a_shard.contiguous()
    form = parallel.async_tp.form("all_gather_matmul", a_shard.shape[0] * parallel.size)
    return form.all_gather_matmul(parallel, a_shard, b)


def matmul_reduce_scatter_start(parallel, a: torch.Tensor, b: torch.Tensor) -> Pending:
    """``reduce_scatter(a @ b)``, the reduce-scatter fused with the GEMM where the policy says it pays, else
    the GEMM then the reduce-scatter in flight where the route allows. g-bar's forward."""
    return _matmul_reduce_scatter(parallel, a, b, in_flight=True)


def matmul_reduce_scatter(parallel, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``reduce_scatter(a @ b)`` now: unfused, the synchronous collective (an async start and its wait cost
    host time that nothing overlaps here)."""
    return _matmul_reduce_scatter(parallel, a, b, in_flight=False).wait()


def _matmul_reduce_scatter(parallel, a: torch.Tensor, b: torch.Tensor, in_flight: bool) -> Pending:
    if parallel.size == 1:
        return Pending(a @ b)
    check_divisible(parallel, a, "reduce_scatter")
    a = a.contiguous()
    form = parallel.async_tp.form("matmul_reduce_scatter", a.shape[0], columns=b.shape[-1])
    return form.matmul_reduce_scatter(parallel, a, b, in_flight)


def gather_to_first(parallel, x: torch.Tensor):
    """Every rank's ``x`` concatenated along dim 0 on TP rank 0 only (None on the others, which only
    send): for an export that one rank writes, so no other rank holds the full tensor."""
    if parallel.size == 1:
        return x
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(parallel.size)] if parallel.rank == 0 else None
    with issued(parallel, "gather", x):
        dist.gather(x, pieces, dst=global_rank(parallel.group, 0), group=parallel.group)
    return torch.cat(pieces) if pieces is not None else None


def all_gather_packed(parallel, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``all_gather`` of several tensors with equal dim 0 (any dtypes) in ONE collective: each row's bytes
    are concatenated, gathered, and split back (e.g. the MoE's hidden state with its routing)."""
    if parallel.size == 1:
        return list(tensors)
    rows = [t.contiguous().view(t.shape[0], math.prod(t.shape[1:])) for t in tensors]
    raw = [r.view(torch.uint8) for r in rows]
    gathered = all_gather(parallel, torch.cat(raw, dim=1))
    out, offset = [], 0
    for t, r in zip(tensors, raw):
        piece = gathered[:, offset:offset + r.shape[1]].contiguous().view(t.dtype)
        out.append(piece.view((gathered.shape[0],) + tuple(t.shape[1:])))
        offset += r.shape[1]
    return out


def all_to_all(parallel, x: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int]) -> torch.Tensor:
    """Send ``send_rows[r]`` consecutive rows of ``x`` to rank r; returns the rows received, in rank order
    (``recv_rows[r]`` from rank r). Split sizes vary per call (expert dispatch)."""
    if parallel.size == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(recv_rows),) + tuple(x.shape[1:]))
    with issued(parallel, "all_to_all", x):
        dist.all_to_all_single(out, x, list(recv_rows), list(send_rows), group=parallel.group)
    return out


def split(parallel, x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous 1/t of dim 0 (no communication)."""
    if parallel.size == 1:
        return x
    check_divisible(parallel, x, "split")
    rows = x.shape[0] // parallel.size
    return x[parallel.rank * rows:(parallel.rank + 1) * rows]


def broadcast_object(parallel, obj, src: int = 0):
    """Send a picklable object from TP rank ``src`` to every TP rank (used off the hot path)."""
    if parallel.size == 1:
        return obj
    box = [obj]
    with issued(parallel, "broadcast_object"):
        dist.broadcast_object_list(box, src=global_rank(parallel.group, src), group=parallel.group)
    return box[0]


def gather_objects_to_first(parallel, obj):
    """Every TP rank's picklable ``obj`` on TP rank 0, in rank order; None on the others (off the hot path)."""
    if parallel.size == 1:
        return [obj]
    every = [None] * parallel.size if parallel.rank == 0 else None
    with issued(parallel, "gather_objects"):
        dist.gather_object(obj, every, dst=global_rank(parallel.group, 0), group=parallel.group)
    return every


def all_gather_objects_over(group, obj) -> list:
    """Every rank's picklable ``obj`` over a framework's own ``group`` (e.g. sglang's TP CPU group), in rank order."""
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, obj, group=group)
    return every


def barrier(parallel) -> None:
    if parallel.size > 1:
        with issued(parallel, "barrier"):
            dist.barrier(group=parallel.group)


def mean_over_group(parallel, x: torch.Tensor, group) -> torch.Tensor:
    """x's mean over a framework's own ``group`` (not TP: e.g. a loss over Megatron's data-parallel ranks),
    in a new tensor; not counted among the TP collectives."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    out = x.detach().clone()
    with issued(parallel, "all_reduce over a framework group"):
        dist.all_reduce(out, group=group)
    return out / size
