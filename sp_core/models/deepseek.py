"""DeepSeek V2 / V2-Lite / V3 / V3.2 decoder stack. Single-device math; the layers' types decide how it is split.

Layer i: x + MLA(norm(x)), then h + MLP(norm(h)) with a dense SwiGLU MLP for the layers before
``first_k_dense_replace`` (``mlp_layer_types`` "dense") and a mixture of experts after ("sparse").
V3.2's MLA attends only to the keys its DSA indexer selects.
"""
from __future__ import annotations

from typing import Union

import torch

from sp_core.layers import DecoderLayer, SwiGLUMLP
from sp_core.layers.attention import AttentionKernel, packed_causal_attention
from sp_core.layers.indexer import LightningIndexer
from sp_core.layers.mla import LatentAttentionKernel, MultiHeadLatentAttention
from sp_core.models.config import ModelConfig
from sp_core.models.stack import DecoderStack, KernelForLayer, moe_block, packed_causal_attention_for


def deepseek_indexer(cfg: ModelConfig, dtype=None, keys=None) -> LightningIndexer:
    """V3.2's DSA indexer; its rope has MLA's frequencies (half-split pairs on its first qk_rope_head_dim dims).
    ``keys``: where it finds its keys (indexer.py's ``BatchIndexKeys`` interface; None: the batch's own)."""
    mla, idx = cfg.mla, cfg.indexer
    return LightningIndexer(cfg.hidden_size, mla.q_lora_rank, idx.index_n_heads, idx.index_head_dim,
                            mla.qk_rope_head_dim, idx.index_topk, cfg.rope_theta, cfg.rope_scaling, dtype=dtype,
                            keys=keys)


def deepseek_attention(cfg: ModelConfig, dtype=None,
                       kernel: Union[AttentionKernel, LatentAttentionKernel] = packed_causal_attention
                       ) -> MultiHeadLatentAttention:
    """``kernel``: an attention kernel (the expanded form) or a ``LatentAttentionKernel`` (the absorbed form;
    a serving kernel that caches V3.2's index keys too offers them as ``index_keys``)."""
    mla = cfg.mla
    index_keys = kernel.index_keys if isinstance(kernel, LatentAttentionKernel) else None
    return MultiHeadLatentAttention(
        cfg.hidden_size, cfg.num_attention_heads, mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim,
        mla.qk_rope_head_dim, mla.v_head_dim, mla.softmax_scale, cfg.rope_theta, cfg.rope_scaling,
        rope_interleave=mla.rope_interleave, bias=mla.attention_bias, kernel=kernel,
        indexer=deepseek_indexer(cfg, dtype, index_keys) if cfg.indexer is not None else None, dtype=dtype)


def deepseek_moe(cfg: ModelConfig, dtype=None) -> torch.nn.Module:
    return moe_block(cfg, dtype)


class DeepseekDecoderLayer(DecoderLayer):
    """DecoderLayer of ``layer_type`` "dense" (SwiGLU MLP) or "sparse" (MoE); the base ``forward`` hands the
    MLP the batch's real token count (the MoE never routes SP padding rows)."""

    def __init__(self, cfg: ModelConfig, layer_type: str, dtype=None,
                 attention_kernel: Union[AttentionKernel, LatentAttentionKernel] = packed_causal_attention):
        is_moe = layer_type == "sparse"
        mlp = deepseek_moe(cfg, dtype) if is_moe else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype)
        super().__init__(deepseek_attention(cfg, dtype, attention_kernel), mlp, cfg.hidden_size, cfg.rms_norm_eps,
                         dtype=dtype)
        self.is_moe = is_moe


class DeepseekModel(DecoderStack):
    """Embedding, DeepSeek decoder layers (dense or MoE, per ``cfg.layer_types``), final norm (HF's ``model.*``)."""

    def __init__(self, cfg: ModelConfig, dtype=None, attention_kernel: KernelForLayer = packed_causal_attention_for):
        super().__init__(cfg, lambda i: DeepseekDecoderLayer(cfg, cfg.layer_types[i], dtype, attention_kernel(i)),
                         dtype=dtype)
