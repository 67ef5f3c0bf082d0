"""The core's attention kernel on sglang's attention backend and paged KV cache (``RadixAttention``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SglangBatch:
    """What the core hands down to its attention kernels: sglang's batch and its real token count
    (under SP the kernel sees the token count padded to a multiple of the tp size)."""

    forward_batch: object
    num_tokens: int


class RadixAttentionKernel(torch.nn.Module):
    """``kernel(q, k, v, batch)`` of ``sp_core.layers.SelfAttention``: drops the SP padding rows, runs
    sglang's ``RadixAttention`` on the batch's tokens in batch order, pads the output back."""

    def __init__(self, attn: torch.nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: SglangBatch) -> torch.Tensor:
        n, padded, heads = batch.num_tokens, q.shape[0], q.shape[1]
        out = self.attn(q[:n].reshape(n, -1), k[:n].reshape(n, -1), v[:n].reshape(n, -1), batch.forward_batch)
        out = out.reshape(n, heads, -1)
        return F.pad(out, (0, 0, 0, 0, 0, padded - n)) if padded > n else out
