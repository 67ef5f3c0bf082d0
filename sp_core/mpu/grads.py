"""Gradient finalisation for users outside Megatron (Megatron's finalize_model_grads does the same)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from sp_core.mpu import collectives
from sp_core.mpu.context import ParallelContext, context_for


def allreduce_sequence_parallel_grads(params: Iterable[torch.nn.Parameter],
                                      parallel: Optional[ParallelContext] = None) -> int:
    """Sum over TP the gradients of parameters tagged ``sequence_parallel`` (each rank saw only its
    token shard, so its gradient is a partial sum). Returns how many gradients were summed."""
    p = context_for(parallel)
    if not p.sequence_parallel_active:
        return 0
    grads = [q.grad for q in params if getattr(q, "sequence_parallel", False) and q.grad is not None]
    if not grads:
        return 0
    flat = collectives.all_reduce(p, torch.cat([g.reshape(-1) for g in grads]))
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))
    return len(grads)


def allreduce_context_parallel_grads(params: Iterable[torch.nn.Parameter],
                                     parallel: Optional[ParallelContext] = None) -> int:
    """Sum over CP the gradient of every parameter (each CP rank saw only its part of every sequence;
    Megatron sums them over its data-parallel-with-CP group). Returns how many gradients were summed."""
    cp = context_for(parallel).cp
    grads = [q.grad for q in params if q.grad is not None]
    if cp.size == 1 or not grads:
        return 0
    flat = collectives.all_reduce(cp, torch.cat([g.reshape(-1) for g in grads]))
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))
    return len(grads)
