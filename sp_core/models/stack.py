"""The decoder stack every model shares: embedding, decoder layers, final norm (HF's ``model.*``).

A model passes the constructor its decoder layer builder (layer index -> layer); the rest is the same.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from sp_core.layers import RMSNorm, VocabParallelEmbedding
from sp_core.layers.attention import AttentionKernel, packed_causal_attention
from sp_core.models.config import ModelConfig

KernelForLayer = Callable[[int], AttentionKernel]
"""Layer index -> that layer's attention kernel (a serving framework's kernel is per layer)."""


def moe_block(cfg: ModelConfig, dtype=None) -> torch.nn.Module:
    """The core's MoE layer, configured by ``cfg.moe`` (routing, experts, shared experts) and
    ``cfg.moe_parallel`` (experts split over TP, or whole experts per rank)."""
    from sp_core.layers.moe import MoE
    from sp_core.layers.router import RouterConfig

    moe = cfg.moe
    router = RouterConfig(moe.n_routed_experts, moe.num_experts_per_tok, moe.topk_method, moe.n_group,
                          moe.topk_group, moe.norm_topk_prob, moe.routed_scaling_factor)
    return MoE(cfg.hidden_size, moe.moe_intermediate_size, moe.n_routed_experts, moe.num_experts_per_tok,
               moe.n_shared_experts, router, expert_parallel=cfg.moe_parallel == "ep", dtype=dtype,
               shared_intermediate_size=moe.shared_expert_intermediate_size, shared_expert_gate=moe.shared_expert_gate)


def packed_causal_attention_for(layer_index: int) -> AttentionKernel:
    return packed_causal_attention


class DecoderStack(torch.nn.Module):
    """Embedding, ``decoder_layer(i)`` for each layer i, final norm."""

    def __init__(self, cfg: ModelConfig, decoder_layer: Callable[[int], torch.nn.Module], dtype=None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = torch.nn.ModuleList(decoder_layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch,
                num_tokens: Optional[int] = None) -> torch.Tensor:
        """num_tokens: real tokens before SP padding (default: all of ``input_ids``)."""
        num_tokens = input_ids.shape[0] if num_tokens is None else num_tokens
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, positions, batch, num_tokens)
        return self.norm(hidden)
