"""Pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h)). Token shard in and out under SP.

``mlp(x, num_tokens)``: num_tokens is the batch's real token count before SP padding (an MoE never routes
padding rows and needs it; a dense MLP ignores it)."""
from __future__ import annotations

from typing import Optional

import torch

from sp_core.layers.norm import RMSNorm


class DecoderLayer(torch.nn.Module):
    def __init__(self, self_attn: torch.nn.Module, mlp: torch.nn.Module, hidden_size: int, eps: float, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps, dtype=dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, dtype=dtype)
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, batch,
                num_tokens: Optional[int] = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden), positions, batch)
        normed, hidden = self.post_attention_layernorm(attn, hidden)  # residual add fused into the norm
        return hidden + self.mlp(normed, num_tokens)
