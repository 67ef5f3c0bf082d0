"""Activation memory per decoder layer: the paper's formulas, and bytes saved for backward, measured."""
from __future__ import annotations

from typing import Dict

import torch

from sp_core.models import ModelConfig

BYTES_16BIT = 2


def report(cfg: ModelConfig, tp: int, tokens: int, sequence_parallel: bool) -> Dict:
    """Korthikanti et al. 2022, Table 2: activation bytes per layer, 16-bit activations, with
    s*b = tokens (one sequence of ``tokens``), h = hidden, a = heads, t = tp.

    full:      s b h (10 + 24/t + 5 a s / (h t))            TP only
               s b h (34 + 5 a s / h) / t                    TP + SP
    selective: the attention-score term dropped (recomputed, or never stored by a fused attention
               kernel): s b h (10 + 24/t) and 34 s b h / t.
    The paper derives them for a GPT layer (MHA, 4h MLP); for GQA / SwiGLU they are an estimate.
    """
    sbh, a, h, s, t = tokens * cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_size, tokens, tp
    sp = sequence_parallel and t > 1
    if sp:
        full, selective = sbh * (34 + 5 * a * s / h) / t, 34 * sbh / t
        formula = "sbh/t * (34 + 5as/h)"
    else:
        full, selective = sbh * (10 + 24 / t + 5 * a * s / (h * t)), sbh * (10 + 24 / t)
        formula = "sbh * (10 + 24/t + 5as/(ht))"
    return {
        "model": cfg.architecture,
        "tp": t,
        "tokens": tokens,
        "sequence_parallel": sp,
        "formula": formula,
        "activation_bytes_per_layer": int(full),
        "activation_bytes_per_layer_selective": int(selective),
        "bytes_per_value": BYTES_16BIT,
        "hidden_size": h,
        "num_attention_heads": a,
    }


def _measure_rank(model_dir: str, tokens: int) -> int:
    from sp_core import mpu
    from sp_core.layers import PackedBatch
    from sp_core.models.qwen import qwen_decoder_layer

    cfg = ModelConfig.from_pretrained(model_dir)
    layer = qwen_decoder_layer(cfg, dtype=torch.bfloat16)
    param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    rows = mpu.padded_length(tokens) // mpu.tp_size() if mpu.sequence_parallel_active() else tokens
    hidden = torch.randn(rows, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = mpu.pad_1d(torch.arange(tokens)) if mpu.sequence_parallel_active() else torch.arange(tokens)
    storages = {}

    def pack(x: torch.Tensor):
        storage = x.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        layer(hidden, positions, PackedBatch([tokens]))
    return sum(storages.values())


def measure(model_dir: str, tp: int, tokens: int, sequence_parallel: bool) -> int:
    """Bytes saved for backward by one decoder layer on rank 0 (bfloat16 activations, CPU ranks)."""
    from sp_core.mpu.launch import run_ranks

    return run_ranks(tp, _measure_rank, model_dir, tokens, sequence_parallel=sequence_parallel)[0]
