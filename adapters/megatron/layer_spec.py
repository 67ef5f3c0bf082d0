"""ModuleSpecs for megatron.core users who build their own GPTModel: the core's decoder layer as a
Megatron transformer layer, and the core's RMSNorm (SP-tagged) as the block's final norm.

Qwen2 / Qwen3 layers are described by Megatron's config alone. DeepSeek layers (MLA, dense MLP or MoE
per layer, V3.2's indexer) are built from the checkpoint's config.json (``config.sp_core_hf_model``, set
by ``transformer_config_from_hf``): the whole attention module and the whole MLP / MoE module are the
core's, since Megatron's MLA accepts only its own linear classes for the down-projections."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import BaseTransformerLayer

from sp_core import mpu
from sp_core.kernels import batch_invariant
from sp_core.layers import RMSNorm
from sp_core.models import ModelConfig
from sp_core.models.config import DEEPSEEK_ARCHITECTURES
from sp_core.models.deepseek import DeepseekDecoderLayer
from sp_core.models.qwen import qwen_decoder_layer
from sp_core_megatron.batch import (MegatronBatch, context_parallel_batch, document_positions, megatron_attention,
                                    packed_cu_seqlens)
from sp_core_megatron.bind import bind_tensor_parallel_group, parameter_device

DEFAULT_ROPE_THETA = 10000.0


def model_config_from_megatron(config, rope_theta: float, rope_scaling: Optional[dict] = None) -> ModelConfig:
    """The core's config for one Qwen-style layer with Megatron's shapes (qk_layernorm -> Qwen3)."""
    return ModelConfig(
        architecture="Qwen3ForCausalLM" if config.qk_layernorm else "Qwen2ForCausalLM", vocab_size=0,
        hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_query_groups,
        head_dim=config.kv_channels, rms_norm_eps=config.layernorm_epsilon, rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_position_embeddings=0, tie_word_embeddings=False,
        qkv_bias=config.add_qkv_bias, qk_norm=config.qk_layernorm)


class SPCoreTransformerLayer(MegatronModule, BaseTransformerLayer):
    """The core's pre-norm decoder layer behind Megatron's layer interface ([s/t, b, h] under SP).

    Honours Megatron's ``attention_mask`` ([b or 1, 1, s, s], True = masked out) and
    ``packed_seq_params`` (THD: attention within each document, positions restarting at 0). Under context
    parallelism the layer holds this CP rank's part of each sequence (Megatron's zig-zag split; causal
    batches only) and its rotary takes the tokens' global positions."""

    def __init__(self, config, layer_number: int = 1, rope_theta: Optional[float] = None,
                 rope_scaling: Optional[dict] = None, **unused):
        MegatronModule.__init__(self, config)
        self.parallel = bind_tensor_parallel_group(config)
        self.layer_number = layer_number
        if rope_theta is None:  # from the config when it came from transformer_config_from_hf
            rope_theta = getattr(config, "rotary_base", None) or DEFAULT_ROPE_THETA
            rope_scaling = getattr(config, "rope_scaling_config", None)
        checkpoint = self._deepseek_config(config)
        with torch.device(parameter_device(config)), mpu.building(self.parallel):
            if checkpoint is not None:
                self.layer = DeepseekDecoderLayer(checkpoint, checkpoint.layer_types[layer_number - 1],
                                                  dtype=config.params_dtype, attention_kernel=megatron_attention)
            else:
                self.layer = qwen_decoder_layer(model_config_from_megatron(config, rope_theta, rope_scaling),
                                                dtype=config.params_dtype, attention_kernel=megatron_attention)

    @staticmethod
    def _deepseek_config(config) -> Optional[ModelConfig]:
        """The checkpoint's config when it is a DeepSeek one (its layers need more than Megatron's fields)."""
        from sp_core_megatron.config import check_supported_for_model, moe_parallel_mode

        model_dir = getattr(config, "sp_core_hf_model", None)
        if not model_dir:
            return None
        checkpoint = ModelConfig.from_pretrained(model_dir, moe_parallel_mode(config))
        if checkpoint.architecture not in DEEPSEEK_ARCHITECTURES:
            return None
        check_supported_for_model(config, checkpoint)
        return checkpoint

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """For Megatron's dist_checkpointing: global (Hugging Face) shapes, this rank's offsets."""
        from sp_core_megatron.checkpointing import core_sharded_state_dict

        return core_sharded_state_dict(self, prefix, sharded_offsets)

    def forward(self, hidden_states, attention_mask=None, packed_seq_params=None, **unused):
        rows, b, h = hidden_states.shape
        with self.parallel.sequence_parallel_for(self.config.sequence_parallel), \
                batch_invariant.gemms(self.parallel.deterministic):
            s = rows * self.parallel.size if self.parallel.sequence_parallel_active else rows
            cu_seqlens = packed_cu_seqlens(packed_seq_params, b)
            if self.parallel.cp_size > 1:  # this CP rank's part of each sequence, as Megatron split it
                batch = context_parallel_batch(s, b, self.parallel, hidden_states.device, attention_mask,
                                               packed_seq_params)
                positions = batch.key_position[batch.own]
            elif cu_seqlens is not None:
                positions = document_positions(cu_seqlens, s)
            else:
                positions = _s_major_positions(s, b, hidden_states.device)
            if self.parallel.cp_size == 1:
                batch = MegatronBatch.from_megatron(s, b, hidden_states.device, attention_mask, packed_seq_params,
                                                    self.parallel.deterministic)
            tokens = hidden_states.reshape(rows * b, h)
            if isinstance(self.layer, DeepseekDecoderLayer):  # Megatron's SP needs s divisible by t: no padding
                out = self.layer(tokens, positions, batch, s * b)
            else:
                out = self.layer(tokens, positions, batch)
        return out.view(rows, b, h), None


@functools.lru_cache(maxsize=8)
def _s_major_positions(s: int, b: int, device: torch.device) -> torch.Tensor:
    """The position of each row of an [s, b] token grid viewed as [s*b]: built once, not by every layer of
    every step (nothing writes to it; the rotary saves it for backward, where a write would be caught)."""
    return torch.arange(s, device=device).repeat_interleave(b)


class SPCoreFinalNorm(RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        with torch.device(parameter_device(config)):
            super().__init__(hidden_size, eps, dtype=config.params_dtype)


def deterministic_gpt_model(model: torch.nn.Module) -> torch.nn.Module:
    """In Megatron's ``deterministic_mode``, run the whole forward of ``model`` (a GPTModel with
    ``get_sp_core_block_spec``) with the core's batch-invariant GEMMs: the core's layers turn them on
    themselves, Megatron's own output layer only inside this. ``load_hf_into_gpt_model`` applies it; a
    model loaded otherwise (e.g. from a dist checkpoint) needs this call. Nothing changes in the default mode."""
    if getattr(model.config, "deterministic_mode", False) and not getattr(model, "_sp_core_batch_invariant", False):
        forward = model.forward

        @functools.wraps(forward)
        def batch_invariant_forward(*args, **kwargs):
            with batch_invariant.gemms(True):
                return forward(*args, **kwargs)

        model.forward = batch_invariant_forward
        model._sp_core_batch_invariant = True
    return model


def get_sp_core_block_spec(num_layers: int, rope_theta: Optional[float] = None,
                           rope_scaling: Optional[dict] = None) -> TransformerBlockSubmodules:
    """For ``GPTModel(config, transformer_layer_spec=get_sp_core_block_spec(...), ...,
    position_embedding_type="none")``: the core's layers and final norm; rotary inside the layers.
    ``rope_theta`` / ``rope_scaling`` default to the config's (``transformer_config_from_hf`` sets them),
    else theta 10000 without scaling."""
    layer = ModuleSpec(module=SPCoreTransformerLayer, params={"rope_theta": rope_theta, "rope_scaling": rope_scaling})
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=ModuleSpec(module=SPCoreFinalNorm))
