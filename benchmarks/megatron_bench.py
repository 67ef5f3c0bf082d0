"""Training step inside Megatron: megatron-core's own GPTModel (its local layer spec, sequence_parallel)
vs the same GPTModel built with sp-core's layer spec (get_sp_core_block_spec). Same embedding, LM head
and loss (Megatron's); only the decoder layers differ. Forward + backward, bf16, median of iters.

Megatron's local spec needs an SP-capable norm without apex / Transformer Engine: the test-support
SequenceParallelNorm (tests/support/megatron_cpu.py) stands in for apex's FusedLayerNorm. Without TE,
Megatron's attention is its unfused DotProductAttention; sp-core uses torch SDPA (flash)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from benchmarks.bench import SHAPE, _timed  # noqa: E402


def _config(layers: int, tp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=layers, hidden_size=SHAPE["hidden_size"], num_attention_heads=SHAPE["num_attention_heads"],
        num_query_groups=SHAPE["num_key_value_heads"], kv_channels=SHAPE["head_dim"],
        ffn_hidden_size=SHAPE["intermediate_size"], normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, add_bias_linear=False, qk_layernorm=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, sequence_parallel=True, bf16=True, params_dtype=torch.bfloat16,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False)


def _model(variant: str, layers: int, tp: int, tokens: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from sp_core_megatron import get_sp_core_block_spec
    from support.megatron_cpu import SequenceParallelNorm, local_gpt_layer_spec

    config = _config(layers, tp)
    if variant == "native":
        spec = TransformerBlockSubmodules(layer_specs=[local_gpt_layer_spec(qk_layernorm=True, normalization="RMSNorm")]
                                          * layers, layer_norm=SequenceParallelNorm)
        kwargs = dict(position_embedding_type="rope", rotary_base=int(SHAPE["rope_theta"]))
    else:
        spec = get_sp_core_block_spec(layers, rope_theta=SHAPE["rope_theta"])
        kwargs = dict(position_embedding_type="none")
    with torch.device("cuda"):
        model = GPTModel(config, spec, vocab_size=SHAPE["vocab_size"], max_sequence_length=tokens, **kwargs)
    return model.cuda()


def _rank(layers: int, tokens_list, iters: int):
    from megatron.core import parallel_state, tensor_parallel

    from sp_core import mpu

    tp = mpu.tp_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    rows = []
    for tokens in tokens_list:
        row = {"tp": tp, "tokens": tokens}
        ids = torch.randint(0, SHAPE["vocab_size"], (1, tokens), device="cuda")
        positions = torch.arange(tokens, device="cuda").unsqueeze(0)
        for variant in ("native", "core"):
            try:
                model = _model(variant, layers, tp, tokens)

                def step():
                    loss = model(ids, positions, None, labels=ids)
                    loss.float().mean().backward()

                ms, peak = _timed(step, iters)
                row[f"{variant}_ms"], row[f"{variant}_peak_bytes"] = ms, peak
            except Exception as err:  # noqa: BLE001 - record and go on to the next point
                row[f"{variant}_error"] = f"{type(err).__name__}: {err}"[:300]
                row[f"{variant}_ms"], row[f"{variant}_peak_bytes"] = float("nan"), 1
            model = None
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def run(tp: int, layers: int, tokens_list, iters: int):
    from sp_core.mpu.launch import run_ranks

    return run_ranks(tp, _rank, layers, tokens_list, iters, timeout=900)[0]
