"""Training step inside Megatron: megatron-core's own GPTModel (its local layer spec, sequence_parallel)
vs the same GPTModel built with sp-core's layer spec (get_sp_core_block_spec). Same embedding, LM head
and loss (Megatron's); only the decoder layers differ. Forward + backward, bf16, median of iters.

Megatron's local spec needs an SP-capable norm without apex / Transformer Engine: the test-support
SequenceParallelNorm (tests/support/megatron_cpu.py) stands in for apex's FusedLayerNorm. Without TE,
Megatron's attention is its unfused DotProductAttention (s x s scores stored); sp-core uses torch SDPA
(flash). The variant "native_sdpa" gives Megatron's layers the same SDPA call (``SDPACoreAttention``, a
bench-only core_attention) so that the comparison is of the layers, not of attention:

    python -m benchmarks.megatron_bench --tp 4 --tokens 2048 --iters 10 --out $OUT   # -> megatron.json / .md
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import CATEGORY_NAMES, SHAPE, header, host_side, kernel_categories, save_results, timed

# variant -> the attention kernel it runs (printed next to every number)
ATTENTION = {
    "native": "Megatron DotProductAttention (local spec, unfused: baddbmm + softmax + bmm, s x s scores)",
    "native_sdpa": "torch SDPA is_causal (flash on sm90) in Megatron's local spec (bench-only SDPACoreAttention)",
    "core": "torch SDPA is_causal (flash on sm90), sp_core_megatron.batch.megatron_attention",
}


class SDPACoreAttention(torch.nn.Module):
    """Bench-only core_attention for Megatron's local spec: torch SDPA, causal, KV heads repeated to the
    query heads (as the core does, which keeps SDPA on its flash kernel). Megatron's interface: q, k, v
    ``[s, b, heads, d]`` -> ``[s, b, heads * d]``."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **_unused):
        super().__init__()
        self.softmax_scale = softmax_scale  # None: SDPA's d^-0.5, as DotProductAttention's default

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention (bench-only) takes causal attention without a mask, bias or packing")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).flatten(2)


def _config(layers: int, tp: int, shape: dict = SHAPE, dtype: torch.dtype = torch.bfloat16):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from sp_core.mpu import platform

    return TransformerConfig(
        num_layers=layers, hidden_size=shape["hidden_size"], num_attention_heads=shape["num_attention_heads"],
        num_query_groups=shape["num_key_value_heads"], kv_channels=shape["head_dim"],
        ffn_hidden_size=shape["intermediate_size"], normalization="RMSNorm", layernorm_epsilon=shape["rms_norm_eps"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, qk_layernorm=True, hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False,
        use_cpu_initialization=platform.device_type() == "cpu")


def build_model(variant: str, layers: int, tp: int, tokens: int, shape: dict = SHAPE, dtype: torch.dtype = torch.bfloat16):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from sp_core.mpu import platform
    from sp_core_megatron import get_sp_core_block_spec
    from tests.support.megatron_cpu import SequenceParallelNorm, local_gpt_layer_spec

    config = _config(layers, tp, shape, dtype)
    if variant in ("native", "native_sdpa"):
        layer = local_gpt_layer_spec(qk_layernorm=True, normalization="RMSNorm")
        if variant == "native_sdpa":
            layer.submodules.self_attention.submodules.core_attention = SDPACoreAttention
        spec = TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=SequenceParallelNorm)
        kwargs = dict(position_embedding_type="rope", rotary_base=int(shape["rope_theta"]))
    else:
        spec = get_sp_core_block_spec(layers, rope_theta=shape["rope_theta"])
        kwargs = dict(position_embedding_type="none")
    with torch.device(platform.current_device()):
        model = GPTModel(config, spec, vocab_size=shape["vocab_size"], max_sequence_length=tokens, **kwargs)
    return model.to(platform.current_device())


def setup_megatron_rank() -> int:
    """In a launched rank: Megatron's parallel state over sp_core's TP size (and, on CPU, the test-support
    shims megatron-core needs there); returns the TP size."""
    from megatron.core import parallel_state, tensor_parallel

    from sp_core import mpu
    from sp_core.mpu import platform

    if platform.device_type() == "cpu":
        from tests.support.megatron_cpu import install_megatron_cpu_shims

        install_megatron_cpu_shims()
    tp = mpu.default_context().size
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return tp


def _rank(layers: int, tokens_list, iters: int, variants=("native", "core"), profile=False):
    from sp_core.mpu import platform

    tp = setup_megatron_rank()
    device = platform.current_device()
    rows = []
    for tokens in tokens_list:
        row = {"tp": tp, "tokens": tokens}
        ids = torch.randint(0, SHAPE["vocab_size"], (1, tokens), device=device)
        positions = torch.arange(tokens, device=device).unsqueeze(0)
        row["attention"] = {v: ATTENTION[v] for v in variants}
        for variant in variants:
            try:
                model = build_model(variant, layers, tp, tokens)

                def step():
                    loss = model(ids, positions, None, labels=ids)
                    loss.float().mean().backward()

                ms, peak = timed(step, iters)
                row[f"{variant}_ms"], row[f"{variant}_peak_bytes"] = ms, peak
                if profile and platform.device_type() == "cuda":
                    row[f"{variant}_kernels"], row[f"{variant}_host"] = kernel_categories(step), host_side(step)
            except Exception as err:  # noqa: BLE001 - record and go on to the next point
                row[f"{variant}_error"] = f"{type(err).__name__}: {err}"[:300]
                row[f"{variant}_ms"], row[f"{variant}_peak_bytes"] = float("nan"), 1
            model = None
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def run(tp: int, layers: int, tokens_list, iters: int, variants=("native", "core"), profile=False):
    from sp_core.procs.launch import run_ranks

    return run_ranks(tp, _rank, layers, tokens_list, iters, tuple(variants), profile, timeout=900)[0]


def markdown(rows, device: str, command: str) -> str:
    lines = [f"Card: {device}; torch {torch.__version__}; command: `{command}`", "",
             "| t | tokens | variant | attention | ms | peak MiB | core / variant time | core / variant memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for v in r["attention"]:
            err = f" (error: {r[f'{v}_error']})" if f"{v}_error" in r else ""
            lines.append(f"| {r['tp']} | {r['tokens']} | {v}{err} | {r['attention'][v]} | {r[f'{v}_ms']:.2f} | "
                         f"{r[f'{v}_peak_bytes'] / 2**20:.0f} | {r['core_ms'] / r[f'{v}_ms']:.3f} | "
                         f"{r['core_peak_bytes'] / max(r[f'{v}_peak_bytes'], 1):.3f} |")
    profiled = [(r, v) for r in rows for v in r["attention"] if f"{v}_kernels" in r]
    if profiled:
        names = CATEGORY_NAMES
        lines += ["", "Kernel ms per step by category (rank 0; collectives include waiting) and the host's enqueue ms:", "",
                  "| t | tokens | variant | wall ms | " + " | ".join(names) + " | enqueue ms | host syncs |",
                  "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
        for r, v in profiled:
            k, h = r[f"{v}_kernels"], r[f"{v}_host"]
            lines.append(f"| {r['tp']} | {r['tokens']} | {v} | {r[f'{v}_ms']:.2f} | " + " | ".join(f"{k[c]:.2f}" for c in names)
                         + f" | {h['enqueue_ms']:.2f} | {h['host_syncs']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description="Training step inside Megatron: native layers vs sp-core's")
    parser.add_argument("--tp", default="4")
    parser.add_argument("--tokens", default="2048")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--variants", default="native,native_sdpa,core")
    parser.add_argument("--out", default="out")
    parser.add_argument("--profile", action="store_true", help="kernel time by category and host enqueue time (CUDA)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(ATTENTION))
    if unknown or "core" not in variants:
        parser.error(f"--variants: unknown {unknown} or no 'core'; choose among {list(ATTENTION)}, with core")
    results = header(shape=SHAPE, layers=args.layers, rows=[])
    for t in (int(x) for x in args.tp.split(",")):
        results["rows"] += run(t, args.layers, [int(x) for x in args.tokens.split(",")], args.iters, variants,
                               args.profile)
    text = markdown(results["rows"], results["device"], results["command"])
    save_results(args.out, results, text, name="megatron")
    print(text)


if __name__ == "__main__":
    main()
