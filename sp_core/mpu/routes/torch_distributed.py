"""The route over torch.distributed on the context's group. gloo sums bf16 too coarsely: it sums bf16 in
float32 and rounds once."""
from __future__ import annotations

import torch
import torch.distributed as dist

from sp_core.mpu import door

# torch >= 2.12 renamed the tensor collectives; the GPU image's torch 2.11 has only the old names.
all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def _widened(parallel, x: torch.Tensor) -> bool:
    return parallel.backend == "gloo" and x.dtype == torch.bfloat16


def reduce_scatter_in_flight(parallel, x: torch.Tensor):
    """(out, work, dtype to return) of an async reduce-scatter of a contiguous ``x``, not counted."""
    wide = x.float() if _widened(parallel, x) else x
    out = door.rows_over(wide, parallel.size)
    work = reduce_scatter_tensor(out, wide, group=parallel.group, async_op=True)
    return out, work, x.dtype if wide.dtype != x.dtype else None


class TorchDistributed:
    def __init__(self, parallel):
        self.parallel = parallel

    def all_reduce(self, x: torch.Tensor, op: str = "sum", in_place: bool = False) -> torch.Tensor:
        p = self.parallel
        out = x if in_place and x.is_contiguous() else x.contiguous().clone()
        with door.issued(p, "all_reduce", x):
            if _widened(p, out):
                wide = out.float()
                dist.all_reduce(wide, op=_REDUCE_OPS[op], group=p.group)
                return wide.to(out.dtype)
            dist.all_reduce(out, op=_REDUCE_OPS[op], group=p.group)
            return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parallel
        x = x.contiguous()
        out = door.rows_times(x, p.size)
        with door.issued(p, "all_gather", x):  # not async_op + wait(): NCCL's work object and stream event cost
            all_gather_tensor(out, x, group=p.group)  # ~30 us a call (4 x H200)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parallel
        if _widened(p, x):
            return self.reduce_scatter_start(x).wait()
        door.check_divisible(p, x, "reduce_scatter")
        x = x.contiguous()
        out = door.rows_over(x, p.size)
        with door.issued(p, "reduce_scatter", x):
            reduce_scatter_tensor(out, x, group=p.group)  # synchronous, as all_gather
        return out

    def all_gather_start(self, x: torch.Tensor) -> door.Pending:
        p = self.parallel
        x = x.contiguous()
        out = door.rows_times(x, p.size)
        return door.in_flight(p, "all_gather", x,
                           lambda: door.Pending(out, all_gather_tensor(out, x, group=p.group, async_op=True)))

    def reduce_scatter_start(self, x: torch.Tensor) -> door.Pending:
        p = self.parallel
        door.check_divisible(p, x, "reduce_scatter")
        x = x.contiguous()
        return door.in_flight(p, "reduce_scatter", x, lambda: door.Pending(*reduce_scatter_in_flight(p, x)))
