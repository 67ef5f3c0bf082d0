"""The plain collective in flight beside part of the GEMM (any backend): the all-gather while this rank's own
rows are multiplied; the reduce-scatter in two halves of the output columns, the first half's in flight
while the second half's GEMM runs."""
from __future__ import annotations

from typing import Callable

import torch

from sp_core.mpu import activity
from sp_core.mpu import door
from sp_core.mpu.async_tp.operands import as_autocast_would, gathered_product
from sp_core.mpu.routes import torch_distributed


def gather_beside_own_rows(parallel, a_shard: torch.Tensor, b: torch.Tensor,
                           start_gather: Callable[[torch.Tensor, torch.Tensor], Callable[[], None]]):
    """The whole gather in flight (``start_gather(shard, gathered)`` returns its wait) while this rank's own
    rows are multiplied, then the other ranks' rows."""
    t, r, n = parallel.size, parallel.rank, a_shard.shape[0]
    out = gathered_product(a_shard, b, t)
    gathered = door.rows_times(a_shard, t)
    wait = start_gather(a_shard, gathered)
    torch.matmul(a_shard, b, out=out[r * n:(r + 1) * n])
    wait()
    for lo, hi in ((0, r * n), ((r + 1) * n, t * n)):  # the other ranks' rows, before and after ours
        if hi > lo:
            torch.matmul(gathered[lo:hi], b, out=out[lo:hi])
    return gathered, out


def all_gather_matmul(parallel, a_shard: torch.Tensor, b: torch.Tensor):
    a_shard, b = as_autocast_would(a_shard, b)

    def start(shard, gathered):
        return torch_distributed.all_gather_tensor(gathered, shard, group=parallel.group, async_op=True).wait

    with door.issued(parallel, "all_gather", a_shard):
        return gather_beside_own_rows(parallel, a_shard, b, start)


class _HalvesPending(door.Pending):
    """Two reduce-scatters in flight, each over half of the output columns: ``wait()`` joins them."""

    def __init__(self, halves: list):
        self._halves, self._joined = halves, None

    def wait(self) -> torch.Tensor:
        if self._joined is None:
            halves, self._halves = self._halves, None
            try:
                for _, work, _ in halves:
                    work.wait()
            finally:
                activity.leave_collective()
            self._joined = torch.cat([out if dtype is None else out.to(dtype) for out, _, dtype in halves], -1)
        return self._joined


def matmul_reduce_scatter(parallel, a: torch.Tensor, b: torch.Tensor, in_flight: bool) -> door.Pending:
    """The first half of the output columns reduce-scatters while the second half's GEMM runs (leaves the
    collective when waited on)."""
    a, b = as_autocast_would(a, b)
    half = b.shape[-1] // 2

    def launch():
        return _HalvesPending([torch_distributed.reduce_scatter_in_flight(parallel, a @ b[..., :half]),
                               torch_distributed.reduce_scatter_in_flight(parallel, a @ b[..., half:])])

    pending = door.in_flight(parallel, "reduce_scatter", a, launch)
    return pending if in_flight else door.Pending(pending.wait())
