"""The paper's communication operators (Korthikanti et al. 2022, section 4.2.2), one autograd
Function each, and the two edges of the sequence-parallel region.

    f        copy_to_tp            identity      | all-reduce
    f-bar    reduce_from_tp        all-reduce    | identity
    g        gather_from_sp        all-gather    | reduce-scatter
    g-bar    reduce_scatter_to_sp  reduce-scatter| all-gather
    scatter  scatter_to_sp         split         | all-gather
    gather   gather_to_replicated  all-gather    | split        (scatter's adjoint: the region exit)
    f_r      copy_to_replicas      identity      | sum over each group of r consecutive ranks
                                                   (f on a sub-group: a weight that r ranks hold alike)
    g, many  gather_from_sp_packed one all-gather| reduce-scatter of each gradient
    a2a      all_to_all_tp         all-to-all    | all-to-all with the splits swapped (expert dispatch)
    g_cp     gather_from_cp        all-gather    | reduce-scatter, both over the CP group (the state keys and
                                                   values are computed from, for this CP rank's queries)
    exit_cp  gather_from_cp_exit   all-gather    | split, over the CP group (per-token results every rank
                                                   then uses alike: the region exit)

All act on dim 0 (tokens) over the TP group (the ``_cp`` ones over the CP group) of a ``ParallelContext`` (the caller's; the default context
when none is given: one model per process). Where autograd records nothing (no-grad, or an input that needs no gradient)
they are the plain forward collectives, called without an autograd Function (serving's host cost).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from sp_core.mpu import collectives as c
from sp_core.mpu.context import ParallelContext, context_for
from sp_core.mpu.platform import amp_backward, amp_forward


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, x, parallel):
        fctx.parallel = parallel
        return x

    @staticmethod
    @amp_backward
    def backward(fctx, grad):
        return c.all_reduce(fctx.parallel, grad), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, x, parallel):
        fctx.parallel = parallel
        return c.all_reduce(parallel, x)

    @staticmethod
    @amp_backward
    def backward(fctx, grad):
        return grad, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, x, parallel):
        fctx.parallel = parallel
        return c.all_gather(parallel, x)

    @staticmethod
    @amp_backward
    def backward(fctx, grad):
        return c.reduce_scatter(fctx.parallel, grad), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, x, parallel):
        fctx.parallel = parallel
        return c.reduce_scatter(parallel, x)

    @staticmethod
    @amp_backward
    def backward(fctx, grad):
        return c.all_gather(fctx.parallel, grad), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, x, parallel):
        fctx.parallel = parallel
        return c.split(parallel, x)

    @staticmethod
    @amp_backward
    def backward(fctx, grad):
        return c.all_gather(fctx.parallel, grad), None


class _GatherToReplicated(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, x, parallel):
        fctx.parallel = parallel
        return c.all_gather(parallel, x)

    @staticmethod
    @amp_backward
    def backward(fctx, grad):
        return c.split(fctx.parallel, grad), None


class _CopyToReplicas(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, x, replicas, parallel):
        fctx.replicas, fctx.parallel = replicas, parallel
        return x

    @staticmethod
    @amp_backward
    def backward(fctx, grad):
        # all-gather over TP, then sum this rank's group: no sub-group is created (an adapter binds
        # the framework's TP group and creates none); the gathered tensor is a small weight gradient
        p, r = fctx.parallel, fctx.replicas
        every = c.all_gather(p, grad.unsqueeze(0)).view(p.size // r, r, *grad.shape)
        return every[p.rank // r].sum(0), None, None


def copy_to_replicas(x: torch.Tensor, replicas: int, parallel: Optional[ParallelContext] = None) -> torch.Tensor:
    """f over each group of ``replicas`` consecutive TP ranks: identity forward, the gradient summed
    within the group. For a parameter that several ranks hold alike and apply to different work
    (a KV head shared by the query heads of several ranks when there are fewer KV heads than t)."""
    return _CopyToReplicas.apply(x, replicas, context_for(parallel)) if replicas > 1 and torch.is_grad_enabled() \
        else x


class _GatherFromSPPacked(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, parallel, *xs):
        fctx.parallel = parallel
        gathered = c.all_gather_packed(parallel, xs)
        fctx.mark_non_differentiable(*[g for g in gathered if not g.is_floating_point()])
        return tuple(gathered)

    @staticmethod
    @amp_backward
    def backward(fctx, *grads):
        return (None,) + tuple(c.reduce_scatter(fctx.parallel, g) if g.is_floating_point() else None for g in grads)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(fctx, x, send_rows, recv_rows, parallel):
        fctx.rows, fctx.parallel = (send_rows, recv_rows), parallel
        return c.all_to_all(parallel, x, send_rows, recv_rows)

    @staticmethod
    @amp_backward
    def backward(fctx, grad):
        send_rows, recv_rows = fctx.rows
        return c.all_to_all(fctx.parallel, grad, recv_rows, send_rows), None, None, None


def _recorded(x: torch.Tensor) -> bool:
    """Whether autograd records an op on ``x`` (else an operator needs no backward)."""
    return x.requires_grad and torch.is_grad_enabled()


P = Optional[ParallelContext]


def copy_to_tp(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """f: the input of a TP region (identity forward, all-reduce of the gradient)."""
    p = context_for(parallel)
    return _CopyToTP.apply(x, p) if p.size > 1 and _recorded(x) else x


def reduce_from_tp(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """f-bar: sum the partial outputs of a TP region (all-reduce forward, identity backward)."""
    p = context_for(parallel)
    if p.size == 1:
        return x
    return _ReduceFromTP.apply(x, p) if _recorded(x) else c.all_reduce(p, x)


def gather_from_sp(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """g: token shard -> all tokens, into a TP region whose ranks each produce a partial gradient."""
    p = context_for(parallel)
    if p.size == 1:
        return x
    return _GatherFromSP.apply(x, p) if _recorded(x) else c.all_gather(p, x)


def reduce_scatter_to_sp(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """g-bar: partial sums over all tokens -> the summed token shard."""
    p = context_for(parallel)
    if p.size == 1:
        return x
    return _ReduceScatterToSP.apply(x, p) if _recorded(x) else c.reduce_scatter(p, x)


def scatter_to_sp(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """Replicated tokens -> this rank's token shard."""
    p = context_for(parallel)
    if p.size == 1:
        return x
    return _ScatterToSP.apply(x, p) if _recorded(x) else c.split(p, x)


def gather_to_replicated(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """Token shard -> all tokens, for computation that every rank then repeats identically."""
    p = context_for(parallel)
    if p.size == 1:
        return x
    return _GatherToReplicated.apply(x, p) if _recorded(x) else c.all_gather(p, x)


def gather_from_cp(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """g over CP: every CP rank's rows of ``x`` in CP rank order; the gradient of the gathered rows is summed
    over CP and each rank keeps its own rows' (every CP rank's queries used them)."""
    return gather_from_sp(x, context_for(parallel).cp)


def gather_from_cp_exit(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """Every CP rank's rows of ``x`` in CP rank order, for work every rank then repeats alike (the gradient
    of its own rows comes back to each rank: no sum)."""
    return gather_to_replicated(x, context_for(parallel).cp)


def gather_from_sp_packed(*xs: torch.Tensor, parallel: P = None) -> Tuple[torch.Tensor, ...]:
    """g on several token-sharded tensors (any dtypes) in one all-gather; integer ones get no gradient."""
    p = context_for(parallel)
    return _GatherFromSPPacked.apply(p, *xs) if p.size > 1 else xs


def all_to_all_tp(x: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int],
                  parallel: P = None) -> torch.Tensor:
    """Rows to the ranks that own them (``send_rows[r]`` consecutive rows to rank r); the backward sends
    each row's gradient back the same way. Calling it again with the splits swapped is its inverse."""
    p = context_for(parallel)
    return _AllToAll.apply(x, list(send_rows), list(recv_rows), p) if p.size > 1 else x


def padded_length(num_tokens: int, parallel: P = None) -> int:
    """``num_tokens`` rounded up to a multiple of the tp size (SP shards must be equal)."""
    t = context_for(parallel).size
    return -(-num_tokens // t) * t


def pad_to_multiple(x: torch.Tensor, value: float = 0, parallel: P = None) -> torch.Tensor:
    """Pad dim 0 with ``value`` up to a multiple of the tp size."""
    extra = padded_length(x.shape[0], parallel) - x.shape[0]
    if extra == 0:
        return x
    pad = x.new_full((extra,) + tuple(x.shape[1:]), value)
    return torch.cat([x, pad], dim=0)


def enter_sequence_parallel(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """Region entry for replicated activations: pad to a multiple of t, keep this rank's shard.

    A rank may end up holding only padding (fewer tokens than ranks). Identity when SP is off.
    """
    p = context_for(parallel)
    if not p.sequence_parallel_active:
        return x
    return scatter_to_sp(pad_to_multiple(x, parallel=p), p)


def exit_sequence_parallel(x: torch.Tensor, num_tokens: int, parallel: P = None) -> torch.Tensor:
    """Region exit: gather the token shards and drop the padding. Identity when SP is off."""
    p = context_for(parallel)
    if not p.sequence_parallel_active:
        return x
    return gather_to_replicated(x, p)[:num_tokens]


def pad_1d(x: torch.Tensor, parallel: P = None) -> torch.Tensor:
    """Pad a 1-D integer tensor (token ids, positions) with zeros to a multiple of t."""
    return F.pad(x, (0, padded_length(x.shape[0], parallel) - x.shape[0]))
