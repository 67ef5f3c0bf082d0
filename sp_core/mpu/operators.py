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

All act on dim 0 (tokens). Where autograd records nothing (no-grad, or an input that needs no gradient)
they are the plain forward collectives, called without an autograd Function (serving's host cost).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from sp_core.mpu import collectives as c
from sp_core.mpu import parallel_state as ps
from sp_core.mpu.platform import amp_backward, amp_forward


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x):
        return x

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        return c.all_reduce(grad)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x):
        return c.all_reduce(x)

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        return grad


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x):
        return c.all_gather(x)

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        return c.reduce_scatter(grad)


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x):
        return c.reduce_scatter(x)

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        return c.all_gather(grad)


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x):
        return c.split(x)

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        return c.all_gather(grad)


class _GatherToReplicated(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x):
        return c.all_gather(x)

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        return c.split(grad)


class _CopyToReplicas(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x, replicas):
        ctx.replicas = replicas
        return x

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        # all-gather over TP, then sum this rank's group: no sub-group is created (an adapter binds
        # the framework's TP group and creates none); the gathered tensor is a small weight gradient
        t, r = ps.tp_size(), ctx.replicas
        every = c.all_gather(grad.unsqueeze(0)).view(t // r, r, *grad.shape)
        return every[ps.tp_rank() // r].sum(0), None


def copy_to_replicas(x: torch.Tensor, replicas: int) -> torch.Tensor:
    """f over each group of ``replicas`` consecutive TP ranks: identity forward, the gradient summed
    within the group. For a parameter that several ranks hold alike and apply to different work
    (a KV head shared by the query heads of several ranks when there are fewer KV heads than t)."""
    return _CopyToReplicas.apply(x, replicas) if replicas > 1 and torch.is_grad_enabled() else x
class _GatherFromSPPacked(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, *xs):
        gathered = c.all_gather_packed(xs)
        ctx.mark_non_differentiable(*[g for g in gathered if not g.is_floating_point()])
        return tuple(gathered)

    @staticmethod
    @amp_backward
    def backward(ctx, *grads):
        return tuple(c.reduce_scatter(g) if g.is_floating_point() else None for g in grads)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    @amp_forward
    def forward(ctx, x, send_rows, recv_rows):
        ctx.rows = (send_rows, recv_rows)
        return c.all_to_all(x, send_rows, recv_rows)

    @staticmethod
    @amp_backward
    def backward(ctx, grad):
        send_rows, recv_rows = ctx.rows
        return c.all_to_all(grad, recv_rows, send_rows), None, None


def _recorded(x: torch.Tensor) -> bool:
    """Whether autograd records an op on ``x`` (else an operator needs no backward)."""
    return x.requires_grad and torch.is_grad_enabled()


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """f: the input of a TP region (identity forward, all-reduce of the gradient)."""
    return _CopyToTP.apply(x) if ps.tp_size() > 1 and _recorded(x) else x


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """f-bar: sum the partial outputs of a TP region (all-reduce forward, identity backward)."""
    if ps.tp_size() == 1:
        return x
    return _ReduceFromTP.apply(x) if _recorded(x) else c.all_reduce(x)


def gather_from_sp(x: torch.Tensor) -> torch.Tensor:
    """g: token shard -> all tokens, into a TP region whose ranks each produce a partial gradient."""
    if ps.tp_size() == 1:
        return x
    return _GatherFromSP.apply(x) if _recorded(x) else c.all_gather(x)


def reduce_scatter_to_sp(x: torch.Tensor) -> torch.Tensor:
    """g-bar: partial sums over all tokens -> the summed token shard."""
    if ps.tp_size() == 1:
        return x
    return _ReduceScatterToSP.apply(x) if _recorded(x) else c.reduce_scatter(x)


def scatter_to_sp(x: torch.Tensor) -> torch.Tensor:
    """Replicated tokens -> this rank's token shard."""
    if ps.tp_size() == 1:
        return x
    return _ScatterToSP.apply(x) if _recorded(x) else c.split(x)


def gather_to_replicated(x: torch.Tensor) -> torch.Tensor:
    """Token shard -> all tokens, for computation that every rank then repeats identically."""
    if ps.tp_size() == 1:
        return x
    return _GatherToReplicated.apply(x) if _recorded(x) else c.all_gather(x)


def gather_from_sp_packed(*xs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """g on several token-sharded tensors (any dtypes) in one all-gather; integer ones get no gradient."""
    return _GatherFromSPPacked.apply(*xs) if ps.tp_size() > 1 else xs


def all_to_all_tp(x: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int]) -> torch.Tensor:
    """Rows to the ranks that own them (``send_rows[r]`` consecutive rows to rank r); the backward sends
    each row's gradient back the same way. Calling it again with the splits swapped is its inverse."""
    return _AllToAll.apply(x, list(send_rows), list(recv_rows)) if ps.tp_size() > 1 else x


def padded_length(num_tokens: int) -> int:
    """``num_tokens`` rounded up to a multiple of the tp size (SP shards must be equal)."""
    t = ps.tp_size()
    return -(-num_tokens // t) * t


def pad_to_multiple(x: torch.Tensor, value: float = 0) -> torch.Tensor:
    """Pad dim 0 with ``value`` up to a multiple of the tp size."""
    extra = padded_length(x.shape[0]) - x.shape[0]
    if extra == 0:
        return x
    pad = x.new_full((extra,) + tuple(x.shape[1:]), value)
    return torch.cat([x, pad], dim=0)


def enter_sequence_parallel(x: torch.Tensor) -> torch.Tensor:
    """Region entry for replicated activations: pad to a multiple of t, keep this rank's shard.

    A rank may end up holding only padding (fewer tokens than ranks). Identity when SP is off.
    """
    if not ps.sequence_parallel_active():
        return x
    return scatter_to_sp(pad_to_multiple(x))


def exit_sequence_parallel(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Region exit: gather the token shards and drop the padding. Identity when SP is off."""
    if not ps.sequence_parallel_active():
        return x
    return gather_to_replicated(x)[:num_tokens]


def pad_1d(x: torch.Tensor) -> torch.Tensor:
    """Pad a 1-D integer tensor (token ids, positions) with zeros to a multiple of t."""
    return F.pad(x, (0, padded_length(x.shape[0]) - x.shape[0]))
