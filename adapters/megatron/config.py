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
    """Build the model from sp-core's layers (the core's Qwen2 / Qwen3 / DeepSeek V2 / V3 / V3.2)."""

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
                               params_dtype: torch.dtype = torch.float32, moe_parallel: str = "tp",
                               **overrides) -> SPCoreTransformerConfig:
    """A Megatron TransformerConfig with everything the checkpoint's config.json says (shapes, q/k norm,
    qkv bias, RoPE theta and scaling, tied embeddings, vocabulary), sp_core on. ``moe_parallel`` (MoE
    models): "tp" splits every expert over TP; "ep" places whole experts on the TP ranks, which Megatron
    knows as expert_model_parallel_size = tp, expert_tensor_parallel_size = 1 (see ``moe_parallel_mode``)."""
    cfg = ModelConfig.from_pretrained(model_dir, moe_parallel)
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
    fields.update(_moe_fields(cfg))
    if moe_parallel == "ep":
        fields.update(expert_model_parallel_size=tp, expert_tensor_parallel_size=1)
    fields.update(overrides)
    return SPCoreTransformerConfig(**fields)


def _moe_fields(cfg: ModelConfig) -> dict:
    """Megatron's MoE fields for a DeepSeek checkpoint (its FLOPs and memory reports read them, and
    expert_model_parallel_size > 1 needs num_moe_experts); the core's layers read the checkpoint itself."""
    if cfg.moe is None or "sparse" not in cfg.layer_types:
        return {}
    moe = cfg.moe
    return dict(num_moe_experts=moe.n_routed_experts, moe_ffn_hidden_size=moe.moe_intermediate_size,
                moe_router_topk=moe.num_experts_per_tok,
                moe_shared_expert_intermediate_size=moe.shared_size or None,
                moe_layer_freq=[int(kind == "sparse") for kind in cfg.layer_types],
                moe_router_score_function="sigmoid" if moe.topk_method == "noaux_tc" else "softmax")


def moe_parallel_mode(config: TransformerConfig) -> str:
    """The core's MoE mode from Megatron's own expert-parallel settings, which decide how Megatron's DDP
    and optimizer treat expert gradients (``allreduce=False`` parameters: reduced over expert-data-parallel
    ranks, grad norm over tp x ep):

      expert_model_parallel_size 1, expert_tensor_parallel_size = tp (default)  -> "tp": experts split by TP
      expert_model_parallel_size = tp, expert_tensor_parallel_size 1            -> "ep": whole experts per
                                                                                  TP rank (the core's EP)
    Anything else is refused with one line: the core's experts live on the TP group, not on extra ranks."""
    tp = config.tensor_model_parallel_size
    ep = getattr(config, "expert_model_parallel_size", 1) or 1
    etp = getattr(config, "expert_tensor_parallel_size", None) or tp
    if ep == 1 and etp == tp:
        return "tp"
    if tp > 1 and ep == tp and etp == 1:
        return "ep"
    raise ModelError(f"expert_model_parallel_size={ep} with expert_tensor_parallel_size={etp} at "
                     f"tensor_model_parallel_size={tp} is not supported: sp-core's experts live on the TP group; use "
                     f"expert_model_parallel_size=1 (experts split by TP) or expert_model_parallel_size={tp} with "
                     f"expert_tensor_parallel_size=1 (whole experts per TP rank)")


def check_supported(config: TransformerConfig) -> None:
    """Settings the core does not support yet fail at start-up with one line."""
    unsupported = {
        "pipeline_model_parallel_size": "pipeline parallelism",
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
    if getattr(config, "moe_expert_capacity_factor", None) is not None:
        raise ModelError(f"sp-core's MoE is dropless: moe_expert_capacity_factor={config.moe_expert_capacity_factor} "
                         f"is not supported; unset it (--moe-expert-capacity-factor)")
    moe_parallel_mode(config)


def check_supported_for_model(config: TransformerConfig, cfg: ModelConfig) -> None:
    """What depends on the checkpoint: expert parallelism needs an MoE model, the aux-loss-free bias
    update (Megatron's ``moe_router_enable_expert_bias``) a router with ``e_score_correction_bias``."""
    has_moe = cfg.moe is not None and "sparse" in cfg.layer_types
    if moe_parallel_mode(config) == "ep" and not has_moe:
        raise ModelError(f"expert_model_parallel_size={config.expert_model_parallel_size}: {cfg.architecture} has no "
                         f"MoE layers; use expert_model_parallel_size=1")
    if getattr(config, "moe_router_enable_expert_bias", False) and not (has_moe and cfg.moe.topk_method == "noaux_tc"):
        raise ModelError(f"moe_router_enable_expert_bias: {cfg.architecture}'s router has no e_score_correction_bias "
                         f"(only DeepSeek V3 / V3.2 routing has one); unset it")


def extra_args_provider(parser):
    """For Megatron-LM's ``pretrain(..., extra_args_provider=...)``: adds --sp-core."""
    group = parser.add_argument_group("sp-core")
    group.add_argument("--sp-core", action="store_true", help="build the model from sp-core's TP-SP layers")
    group.add_argument("--sp-core-hf-model", default=None, help="Hugging Face checkpoint to initialise from")
    return parser
