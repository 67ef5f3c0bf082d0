"""Qwen2 / Qwen3 decoder stack. Single-device math; the layers' types decide how it is split."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from sp_core.layers import DecoderLayer, RMSNorm, SelfAttention, SwiGLUMLP, VocabParallelEmbedding
from sp_core.layers.attention import AttentionKernel, packed_causal_attention
from sp_core.models.config import ModelConfig

KernelForLayer = Callable[[int], AttentionKernel]
"""Layer index -> that layer's attention kernel (a serving framework's kernel is per layer)."""


def packed_causal_attention_for(layer_index: int) -> AttentionKernel:
    return packed_causal_attention


def qwen_decoder_layer(cfg: ModelConfig, dtype=None, attention_kernel: AttentionKernel = packed_causal_attention
                       ) -> DecoderLayer:
    attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.rope_theta, cfg.rope_scaling, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                         eps=cfg.rms_norm_eps, dtype=dtype, kernel=attention_kernel)
    mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
    return DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class QwenModel(torch.nn.Module):
    """Embedding, decoder layers, final norm (HF's ``model.*``)."""

    def __init__(self, cfg: ModelConfig, dtype=None, attention_kernel: KernelForLayer = packed_causal_attention_for):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = torch.nn.ModuleList(qwen_decoder_layer(cfg, dtype, attention_kernel(i))
                                          for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch,
                num_tokens: Optional[int] = None) -> torch.Tensor:
        """num_tokens: real tokens before SP padding (default: all of ``input_ids``)."""
        num_tokens = input_ids.shape[0] if num_tokens is None else num_tokens
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, positions, batch, num_tokens)
        return self.norm(hidden)
