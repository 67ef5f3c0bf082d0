"""RMSNorm (pure torch reference; the platform's fused kernel when present) and LayerNorm."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.kernels import lookup
from sp_core.layers.sharding import mark_sequence_parallel


class RMSNorm(torch.nn.Module):
    """Normalises the last dim. ``per_head_on_tp_shard``: the norm is applied to this rank's heads only
    (Qwen3's q/k norm); its weight gradient is then a partial sum over TP, summed here by f.
    Otherwise the norm sees token shards under SP and its weight is tagged ``sequence_parallel``.

    ``forward(x, residual)`` adds first and returns ``(norm(x + residual), x + residual)`` (one kernel
    where the platform has one, in inference).
    """

    def __init__(self, size: int, eps: float = 1e-6, per_head_on_tp_shard: bool = False,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.eps = eps
        self.per_head_on_tp_shard = per_head_on_tp_shard
        # the weight of a norm applied per head on this rank's heads: its gradient is a partial sum (f)
        self.parallel = mpu.context_for() if per_head_on_tp_shard else None
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype))
        if not per_head_on_tp_shard:
            mark_sequence_parallel(self.weight)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return self._norm(x)
        fused = lookup.fused_add_rms_norm()
        if fused is not None and not _needs_grad(x, residual, self.weight) and _same_dtype(x, residual, self.weight):
            return fused(x, residual, self.weight, self.eps)
        added = x + residual
        return self._norm(added), added

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        weight = mpu.copy_to_tp(self.weight, self.parallel) if self.per_head_on_tp_shard else self.weight
        fused = lookup.fused_rms_norm()
        if fused is not None and _same_dtype(x, weight):
            return fused(x, weight, self.eps)
        dtype = x.dtype
        wide = x.float()
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * wide.to(dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _same_dtype(x: torch.Tensor, *others: torch.Tensor) -> bool:
    return x.is_floating_point() and all(o.dtype == x.dtype for o in others)


class LayerNorm(torch.nn.Module):
    """LayerNorm with weight and bias over the last dim (DeepSeek-V3.2's indexer ``k_norm``). Sees token
    shards under SP: weight and bias are tagged ``sequence_parallel``."""

    def __init__(self, size: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(size, dtype=dtype))
        mark_sequence_parallel(self.weight)
        mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
