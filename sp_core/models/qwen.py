"""Qwen2 / Qwen3 decoder stack. Single-device math; the layers' types decide how it is split."""
from __future__ import annotations

from sp_core.layers import DecoderLayer, SelfAttention, SwiGLUMLP
from sp_core.layers.attention import AttentionKernel, packed_causal_attention
from sp_core.models.config import ModelConfig
from sp_core.models.stack import DecoderStack, KernelForLayer, packed_causal_attention_for


def qwen_decoder_layer(cfg: ModelConfig, dtype=None, attention_kernel: AttentionKernel = packed_causal_attention
                       ) -> DecoderLayer:
    attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.rope_theta, cfg.rope_scaling, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                         eps=cfg.rms_norm_eps, dtype=dtype, kernel=attention_kernel)
    mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
    return DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class QwenModel(DecoderStack):
    """Embedding, Qwen decoder layers, final norm (HF's ``model.*``)."""

    def __init__(self, cfg: ModelConfig, dtype=None, attention_kernel: KernelForLayer = packed_causal_attention_for):
        super().__init__(cfg, lambda i: qwen_decoder_layer(cfg, dtype, attention_kernel(i)), dtype=dtype)
