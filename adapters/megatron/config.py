"""The switch and the config: ``SPCoreTransformerConfig.sp_core`` for megatron.core users, ``--sp-core``
for Megatron-LM's argument parser, and one-line start-up errors for settings we do not support."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from sp_core.models import ModelConfig, ModelError


@dataclass
class SPCoreTransformerConfig(TransformerConfig):
    sp_core: bool = False
    """Build the model from sp-core's layers (the core's Qwen2 / Qwen3)."""

    sp_core_hf_model: Optional[str] = None
    """Hugging Face checkpoint directory to initialise from (config.json + safetensors)."""

    # What GPTModel takes as constructor arguments, kept with the config so that one object describes
    # the checkpoint (transformer_config_from_hf fills them; the core's layers read the rope ones).
    vocab_size: Optional[int] = None
    """The checkpoint's vocabulary (GPTModel's ``vocab_size`` needs it padded to a multiple of tp)."""

    rotary_base: float = 10000.0
    """RoPE theta (GPTModel's ``rotary_base``)."""

    rope_scaling_config: Optional[dict] = None
    """The checkpoint's ``rope_scaling`` (linear / dynamic / yarn), None for plain RoPE."""

    share_embeddings_and_output_weights: bool = False
    """Tied input embedding and LM head (``tie_word_embeddings``)."""

    max_position_embeddings: int = 4096


def transformer_config_from_hf(model_dir: str, tp: int = 1, sequence_parallel: bool = False,
                               params_dtype: torch.dtype = torch.float32, **overrides) -> SPCoreTransformerConfig:
    """A Megatron TransformerConfig with everything the checkpoint's config.json says (shapes, q/k norm,
    qkv bias, RoPE theta and scaling, tied embeddings, vocabulary), sp_core on."""
    cfg = ModelConfig.from_pretrained(model_dir)
    fields = dict(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.head_dim, ffn_hidden_size=cfg.intermediate_size,
        layernorm_epsilon=cfg.rms_norm_eps, normalization="RMSNorm", gated_linear_unit=True,
        add_bias_linear=False, add_qkv_bias=cfg.qkv_bias, qk_layernorm=cfg.qk_norm, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, sp_core=True, sp_core_hf_model=model_dir,
        vocab_size=cfg.vocab_size, rotary_base=cfg.rope_theta, rope_scaling_config=cfg.rope_scaling,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    fields.update(overrides)
    return SPCoreTransformerConfig(**fields)


def check_supported(config: TransformerConfig) -> None:
    """Settings the core does not support yet fail at start-up with one line."""
    unsupported = {
        "context_parallel_size": "context parallelism",
        "pipeline_model_parallel_size": "pipeline parallelism",
        "expert_model_parallel_size": "expert parallelism (no MoE model is supported yet)",
    }
    for name, what in unsupported.items():
        value = getattr(config, name, 1) or 1
        if value != 1:
            raise ModelError(f"sp-core does not support {what} yet: {name}={value}; use 1")
    if getattr(config, "virtual_pipeline_model_parallel_size", None) not in (None, 1):
        raise ModelError("sp-core does not support virtual pipeline stages yet; unset "
                         "virtual_pipeline_model_parallel_size")
    if not getattr(config, "sp_core_hf_model", None):
        raise ModelError("sp_core needs a checkpoint: set sp_core_hf_model (--sp-core-hf-model DIR)")


def extra_args_provider(parser):
    """For Megatron-LM's ``pretrain(..., extra_args_provider=...)``: adds --sp-core."""
    group = parser.add_argument_group("sp-core")
    group.add_argument("--sp-core", action="store_true", help="build the model from sp-core's TP-SP layers")
    group.add_argument("--sp-core-hf-model", default=None, help="Hugging Face checkpoint to initialise from")
    return parser
