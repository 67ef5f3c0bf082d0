"""The deterministic mode's route: every sum over TP -- the all-reduce of f-bar and f's backward, the
reduce-scatter of g-bar and g's backward -- takes each element's sum in rank order, whichever rank owns it,
so that a row's value does not depend on how the batch was split:

    collective                  who sums row i (owned by rank d)         order of the t terms
    ring reduce-scatter         passed d+1 -> d+2 -> ... -> d            x[d+1] + ... + x[t-1] + x[0] + ... + x[d]
    ring all-reduce             its reduce-scatter phase, as above       as above, d = the chunk's owner
    tree / halving-doubling     the algorithm's pairing of ranks         depends on size, algorithm, channels
    invariant reduce-scatter    all-to-all of the partial chunks, then   x[0] + x[1] + ... + x[t-1]
                                rank d sums what it received locally     (always)
    invariant all-reduce        invariant reduce-scatter + all-gather    x[0] + x[1] + ... + x[t-1]

A ring's sum starts after the owner, so the same row gets a different rotation of the terms -- and a
different rounding -- when a different rank owns it: SP on vs off (all-reduce vs reduce-scatter), or a
batch whose size moves the row to another token shard (vLLM #56377). With t = 2 the two terms commute
exactly; from t = 3 they do not. The invariant pair moves the same bytes as a ring reduce-scatter
((t-1)/t of the tensor per rank), plus an all-gather for the all-reduce, as a ring all-reduce does.

The all-to-all is always torch.distributed over the bound group, also when a framework communicator is
bound: sglang's ``GroupCoordinator.all_to_all_single`` is a CUDA-only op (it fails on CPU). The gathers, and
a max all-reduce, go by the plain route underneath.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sp_core.mpu import door
from sp_core.mpu.routes import torch_distributed


def sum_in_rank_order(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1] + ... + parts[t-1]``, left to right (bf16 / fp16 accumulate in float32)."""
    wide = parts.float() if parts.dtype in (torch.bfloat16, torch.float16) else parts
    total = wide[0].clone()
    for term in wide[1:]:
        total += term
    return total.to(parts.dtype)


class RankOrderSums:
    def __init__(self, parallel, plain):
        self.parallel, self.plain = parallel, plain

    def _exchange_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """All-to-all of equal chunks: chunk r of ``x`` (dim 0) goes to rank r; the chunks received, in rank order."""
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.parallel.group)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank receives every rank's partial of its rows and adds them up locally, left to right."""
        p = self.parallel
        door.check_divisible(p, x, "reduce_scatter")
        with door.issued(p, "reduce_scatter", x):
            parts = self._exchange_chunks(x.contiguous())
        return sum_in_rank_order(parts.view((p.size, x.shape[0] // p.size) + tuple(x.shape[1:])))

    def all_reduce(self, x: torch.Tensor, op: str = "sum", in_place: bool = False) -> torch.Tensor:
        """The rank-order reduce-scatter of the flattened tensor (padded to a multiple of t), then an all-gather."""
        if op != "sum":
            return self.plain.all_reduce(x, op, in_place)
        p = self.parallel
        t = p.size
        flat = x.contiguous().view(-1)
        padded = -(-flat.numel() // t) * t
        flat = torch.cat([flat, flat.new_zeros(padded - flat.numel())]) if padded > flat.numel() else flat
        with door.issued(p, "all_reduce", x, p.communicator):
            mine = sum_in_rank_order(self._exchange_chunks(flat).view(t, padded // t))
            out = torch.empty_like(flat)
            if p.communicator is not None:
                p.communicator.all_gather_into_tensor(out, mine)
            else:
                torch_distributed.all_gather_tensor(out, mine, group=p.group)
        return out[: x.numel()].view(x.shape)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain.all_gather(x)

    def all_gather_start(self, x: torch.Tensor) -> door.Pending:
        return self.plain.all_gather_start(x)

    def reduce_scatter_start(self, x: torch.Tensor) -> door.Pending:
        return door.Pending(self.reduce_scatter(x))
