"""Hugging Face weights for megatron.core's own GPTModel built with ``get_sp_core_block_spec``.

The name mapping (``{i}``: layer index; the core's layer sits at ``.layer`` inside Megatron's):

| Hugging Face                                      | GPTModel                                              |
|---------------------------------------------------|-------------------------------------------------------|
| model.embed_tokens.weight                         | embedding.word_embeddings.weight (rows past the vocabulary: zero) |
| model.layers.{i}.input_layernorm.weight           | decoder.layers.{i}.layer.input_layernorm.weight       |
| model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias} | decoder.layers.{i}.layer.self_attn.qkv_proj.{weight,bias} (q, k, v packed per rank) |
| model.layers.{i}.self_attn.{q,k}_norm.weight      | decoder.layers.{i}.layer.self_attn.{q,k}_norm.weight (Qwen3) |
| model.layers.{i}.self_attn.o_proj.weight          | decoder.layers.{i}.layer.self_attn.o_proj.weight      |
| model.layers.{i}.post_attention_layernorm.weight  | decoder.layers.{i}.layer.post_attention_layernorm.weight |
| model.layers.{i}.mlp.{gate,up}_proj.weight        | decoder.layers.{i}.layer.mlp.gate_up_proj.weight (gate, up packed per rank) |
| model.layers.{i}.mlp.down_proj.weight             | decoder.layers.{i}.layer.mlp.down_proj.weight         |
| model.norm.weight                                 | decoder.final_layernorm.weight                        |
| lm_head.weight                                    | output_layer.weight (absent when tied: share_embeddings_and_output_weights) |
| model.layers.{i}.{self_attn,mlp}.* (DeepSeek)     | decoder.layers.{i}.layer.{self_attn,mlp}.* (the core's names; routed experts go through the MoE layer's loader, per expert or fused) |

Megatron's vocabulary-parallel embedding and output layer need a vocabulary divisible by tp: GPTModel
gets the padded size (``gpt_model_args``); the padding rows are zero, and their logits are not part
of the checkpoint's vocabulary (drop columns past ``config.vocab_size``).
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch
from megatron.core import parallel_state

from sp_core.models import ModelConfig, ModelError
from sp_core.models.checkpoint import (expected_pieces, hf_to_core, iter_hf_tensors, load_expert_tensor, load_piece,
                                       missing_expert_tensors, refuse_non_finite)
from sp_core.models.fp8 import dequantizing
from sp_core_megatron.layer_spec import deterministic_gpt_model

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_VOCAB_PARALLEL = {"model.embed_tokens.weight": "embedding.word_embeddings.weight", "lm_head.weight": "output_layer.weight"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_EXPERTS = ".mlp.experts."
_MOE = re.compile(r"^decoder\.layers\.(\d+)\.layer\.mlp$")


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def gpt_model_args(config) -> dict:
    """GPTModel's keyword arguments for a config from ``transformer_config_from_hf``:
    ``GPTModel(config, get_sp_core_block_spec(config.num_layers), **gpt_model_args(config))``."""
    return dict(vocab_size=padded_vocab_size(config.vocab_size, config.tensor_model_parallel_size),
                max_sequence_length=config.max_position_embeddings, position_embedding_type="none",
                share_embeddings_and_output_weights=config.share_embeddings_and_output_weights)


def gpt_model_name(hf_name: str) -> Tuple[str, str]:
    """(GPTModel parameter name, packed piece or None) of a Hugging Face tensor name."""
    if hf_name in _VOCAB_PARALLEL:
        return _VOCAB_PARALLEL[hf_name], None
    if hf_name == "model.norm.weight":
        return "decoder.final_layernorm.weight", None
    match = _LAYER.match(hf_name)
    if not match:
        raise ModelError(f"checkpoint tensor {hf_name}: no GPTModel parameter maps to it")
    core_name, shard = hf_to_core(match.group(2))
    return f"decoder.layers.{match.group(1)}.layer.{core_name}", shard


@torch.no_grad()
def load_hf_into_gpt_model(model: torch.nn.Module, model_dir: str) -> None:
    """Load this rank's slice of every tensor of the checkpoint in ``model_dir`` into ``model``
    (a GPTModel with ``get_sp_core_block_spec``); one-line error (ModelError: exit 2 from the command line)
    naming missing / unexpected tensors or one with NaN or inf. An FP8 checkpoint (quantization_config
    quant_method fp8) is dequantised to the model's dtype, each rank its own slice. In Megatron's
    ``deterministic_mode`` the model's whole forward then runs the core's batch-invariant GEMMs
    (``deterministic_gpt_model``)."""
    # parameters and persistent buffers (V3's e_score_correction_bias); routed experts load through their MoE
    params: Dict[str, torch.Tensor] = {n: t for n, t in model.state_dict(keep_vars=True).items()
                                       if _EXPERTS not in f".{n}" and not n.endswith("._extra_state")}
    experts = {f"model.layers.{m.group(1)}.mlp.experts.": module for name, module in model.named_modules()
               if hasattr(module, "load_expert_tensor") and (m := _MOE.match(name))}
    expected = expected_pieces(params)
    seen, unexpected = set(), []
    fp8 = ModelConfig.from_pretrained(model_dir).fp8
    for hf_name, tensor in dequantizing(iter_hf_tensors(model_dir), fp8):
        if _IGNORED.search(hf_name):
            continue
        if _EXPERTS in hf_name:
            if not load_expert_tensor(experts, hf_name, tensor):
                unexpected.append(hf_name)
            continue
        try:
            name, shard = gpt_model_name(hf_name)
        except ModelError:
            unexpected.append(hf_name)
            continue
        unfused = _LAYER.sub(r"decoder.layers.\1.layer.\2", hf_name)
        if (name, shard) not in expected and (unfused, None) in expected:  # DeepSeek-V2-Lite's own q_proj
            name, shard = unfused, None
        if (name, shard) not in expected:
            unexpected.append(hf_name)
            continue
        refuse_non_finite(hf_name, tensor)
        param = expected[(name, shard)]
        if hf_name in _VOCAB_PARALLEL:  # Megatron's layout: contiguous blocks of the padded vocabulary
            rows = param.shape[0]
            rank = parallel_state.get_tensor_model_parallel_rank()
            start = min(rank * rows, tensor.shape[0])
            block = tensor.narrow(0, start, min(rows, tensor.shape[0] - start))  # an FP8Tensor: dequantised
            param.zero_()
            param[: block.shape[0]].copy_(block)
        else:
            load_piece(param, hf_name, tensor, shard)
        seen.add((name, shard))
    missing = sorted(f"{n}{'.' + s if s else ''}" for n, s in set(expected) - seen)
    missing += missing_expert_tensors(experts)
    if missing or unexpected:
        parts = (["GPTModel parameters missing from the checkpoint: " + ", ".join(missing)] if missing else []) + \
                (["checkpoint tensors the GPTModel lacks: " + ", ".join(sorted(unexpected))] if unexpected else [])
        raise ModelError(f"{model_dir} does not match the GPTModel; " + "; ".join(parts))
    deterministic_gpt_model(model)
