"""Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE decoder stack. Single-device math; the layers' types decide how it is split.

Layer i: x + attn(norm(x)), then h + MLP(norm(h)): a dense SwiGLU MLP, or for the MoE Qwens on the layers
``cfg.layer_types`` marks "sparse" (``decoder_sparse_step``, ``mlp_only_layers``) the core's MoE layer.
"""
from __future__ import annotations

from sp_core.layers import DecoderLayer, SelfAttention, SwiGLUMLP
from sp_core.layers.attention import AttentionKernel, packed_causal_attention
from sp_core.models.config import ModelConfig
from sp_core.models.stack import DecoderStack, KernelForLayer, moe_block, packed_causal_attention_for


def qwen_decoder_layer(cfg: ModelConfig, dtype=None, attention_kernel: AttentionKernel = packed_causal_attention,
                       layer_type: str = "dense") -> DecoderLayer:
    attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.rope_theta, cfg.rope_scaling, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                         eps=cfg.rms_norm_eps, dtype=dtype, kernel=attention_kernel)
    is_moe = layer_type == "sparse"
    mlp = moe_block(cfg, dtype) if is_moe else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
    layer = DecoderLayer(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    layer.is_moe = is_moe
    return layer


class QwenModel(DecoderStack):
    """Embedding, Qwen decoder layers (dense or MoE, per ``cfg.layer_types``), final norm (HF's ``model.*``)."""

    def __init__(self, cfg: ModelConfig, dtype=None, attention_kernel: KernelForLayer = packed_causal_attention_for):
        super().__init__(cfg, lambda i: qwen_decoder_layer(cfg, dtype, attention_kernel(i), cfg.layer_types[i]),
                         dtype=dtype)
