"""GPU benchmark: DeepSeek-V3-shaped layers, TP (all-reduce) against TP-SP with the latent gather (the
core's MLA), each with MoE mode (a) TP-sharded experts and (b) expert parallelism. Same output format
as bench.py: JSON + Markdown under --out.

    python benchmarks/deepseek_bench.py --tp 4,2 --tokens 8192,32768 --out $OUT

Shapes: DeepSeek-V3 (hidden 7168, 128 heads split over t, q_lora 1536, kv_lora 512, rope 64, nope 128,
v 128, yarn rope factor 40; 256 routed experts top-8 in 8 groups, topk_group 4, moe_intermediate 2048,
1 shared expert), 1 dense layer (FFN 18432) + 3 MoE layers, random bf16 weights. ``--tiny`` shrinks
everything for a CPU (gloo) smoke run.

Routing: the router is the core's (sigmoid scores, noaux_tc group-limited top-8) on a random gate
(N(0, 0.02) weights) with a random e_score_correction_bias N(0, --bias-std = 0.01) that skews the load the way
trained biases do; the token counts per expert of the first MoE layer are reported (min / mean / max).
Every variant sees the same inputs and weights (same seed), hence the same routing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

V3 = dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
          qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8,
          n_group=8, topk_group=4, moe_intermediate_size=2048, n_shared_experts=1, intermediate_size=18432,
          first_k_dense_replace=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
          routed_scaling_factor=2.5, vocab_size=129280, rms_norm_eps=1e-6, rope_theta=10000.0,
          max_position_embeddings=163840,
          rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                            beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
TINY = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=64, kv_lora_rank=32,
            qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, moe_intermediate_size=64,
            intermediate_size=512)


def v3_config(layers: int, tiny: bool, moe_parallel: str):
    from sp_core.models import ModelConfig

    shape = dict(V3, **(TINY if tiny else {}))
    return ModelConfig.from_dict(dict(shape, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                                      num_hidden_layers=layers), moe_parallel)


def _device() -> str:
    from sp_core.mpu import platform

    return platform.device_type()


def _timed(fn, iters: int, warmup: int = 2):
    """Median milliseconds of fn() and the peak bytes allocated above the starting point during one call."""
    from sp_core.mpu import collectives, platform

    for _ in range(warmup):
        fn()
    platform.synchronize()
    collectives.barrier()
    times = []
    for _ in range(iters):
        platform.synchronize()
        start = time.perf_counter()
        fn()
        platform.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    collectives.barrier()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    platform.reset_peak_memory()
    fn()
    platform.synchronize()
    peak = platform.max_memory_allocated() - before
    return statistics.median(times), peak


def _build_stack(cfg, dtype, device, bias_std: float):
    from sp_core.models.deepseek import DeepseekDecoderLayer

    torch.manual_seed(0)
    with torch.device(device):
        stack = torch.nn.ModuleList(DeepseekDecoderLayer(cfg, kind, dtype=dtype) for kind in cfg.layer_types)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for layer in stack:
        if layer.is_moe:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=gen) * bias_std)
    return stack


def _routing_stats(stack, x_full: torch.Tensor) -> dict:
    """Tokens per expert in the first MoE layer for all T tokens (what every variant routes)."""
    from sp_core.layers.router import count_per_expert

    layer = next(layer for layer in stack if layer.is_moe)
    with torch.no_grad():
        ids, _ = layer.mlp.gate(layer.post_attention_layernorm(x_full))
    counts = count_per_expert(ids, layer.mlp.num_experts).float()
    return {"min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max()),
            "max_over_mean": float(counts.max() / counts.mean()), "empty": int((counts == 0).sum())}


def _grouped_mm_used(stack) -> bool:
    from sp_core.mpu import platform

    experts = next(layer for layer in stack if layer.is_moe).mlp.experts
    w = experts.gate_up_proj
    return platform.grouped_mm_supports(torch.empty(16, w.shape[2], device=w.device, dtype=w.dtype), w)


def _bench_rank(layers: int, tokens_list, iters: int, train: bool, tiny: bool, bias_std: float):
    from sp_core import mpu
    from sp_core.layers import PackedBatch

    device, dtype = _device(), torch.bfloat16
    t = mpu.tp_size()
    rows = {T: {"tokens": T, "tp": t, "train": train} for T in tokens_list}
    for moe in ("tp", "ep"):
        cfg = v3_config(layers, tiny, moe)
        stack = _build_stack(cfg, dtype, device, bias_std)
        if moe == "tp":
            for T in tokens_list:
                x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(device, dtype)
                rows[T]["routing"] = _routing_stats(stack, x)
            grouped = _grouped_mm_used(stack)
        for T in tokens_list:
            positions = torch.arange(T, device=device)
            batch = PackedBatch([T])
            x_full = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(device, dtype)
            for mode in ("tp", "sp"):
                mpu.set_sequence_parallel(mode == "sp")
                x = x_full.chunk(t)[mpu.tp_rank()].contiguous() if mode == "sp" else x_full
                x.requires_grad_(train)
                grad = torch.randn_like(x)

                def run():
                    h = x
                    for layer in stack:
                        h = layer(h, positions, batch, T)
                    if train:
                        h.backward(grad)

                if train:
                    ms, peak = _timed(run, iters)
                    for p in stack.parameters():
                        p.grad = None
                else:
                    with torch.no_grad():
                        ms, peak = _timed(run, iters)
                rows[T][f"{mode}_{moe}_ms"], rows[T][f"{mode}_{moe}_peak_bytes"] = ms, peak
                if not train:  # where the time goes: one MoE layer's MLA and MoE block alone
                    moe_layer = stack[-1]
                    with torch.no_grad():
                        normed = moe_layer.input_layernorm(x)
                        rows[T][f"{mode}_{moe}_mla_ms"] = _timed(
                            lambda: moe_layer.self_attn(normed, positions, batch), iters)[0]
                        rows[T][f"{mode}_{moe}_moe_ms"] = _timed(lambda: moe_layer.mlp(normed, T), iters)[0]
                if mpu.tp_rank() == 0:
                    print(f"  t={t} T={T} {'train' if train else 'prefill'} {mode} moe={moe}: {ms:.2f} ms, "
                          f"peak {peak / 2**20:.0f} MiB", flush=True)
        del stack
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    mpu.set_sequence_parallel(True)
    for r in rows.values():
        r["grouped_mm"] = grouped
        r["weights_note"] = "peak = activations + workspace above the resident weights"
        base = min(r["tp_tp_ms"], r["tp_ep_ms"])
        for moe in ("tp", "ep"):
            r[f"sp_{moe}_over_tp_{moe}"] = r[f"sp_{moe}_ms"] / r[f"tp_{moe}_ms"]
            r[f"sp_{moe}_over_best_tp"] = r[f"sp_{moe}_ms"] / base
            r[f"sp_{moe}_mem_over_tp_{moe}"] = r[f"sp_{moe}_peak_bytes"] / max(1, r[f"tp_{moe}_peak_bytes"])
    return list(rows.values())


def bench(tp: int, layers: int, tokens_list, iters: int, train: bool, tiny: bool, bias_std: float):
    from sp_core.mpu.launch import run_ranks

    return run_ranks(tp, _bench_rank, layers, tokens_list, iters, train, tiny, bias_std, timeout=900)[0]


def markdown(results: dict) -> str:
    lines = [f"Card: {results['device']}; torch {results['torch']}; {results['date']}; "
             f"command: `{results['command']}`", ""]
    for kind, title in (("prefill", "Prefill (no grad, one packed sequence)"), ("train", "Training (forward + backward)")):
        rows = results.get(kind) or []
        if not rows:
            continue
        lines += [f"### {title}, {results['layers']} layers (1 dense + {results['layers'] - 1} MoE)", "",
                  "| t | tokens | MoE mode | TP ms | TP-SP (latent) ms | SP/TP time | SP / best TP | TP peak MiB | "
                  "SP peak MiB | SP/TP memory |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for moe, name in (("tp", "(a) TP-sharded"), ("ep", "(b) EP")):
                lines.append(f"| {r['tp']} | {r['tokens']} | {name} | {r[f'tp_{moe}_ms']:.2f} | {r[f'sp_{moe}_ms']:.2f} | "
                             f"{r[f'sp_{moe}_over_tp_{moe}']:.3f} | {r[f'sp_{moe}_over_best_tp']:.3f} | "
                             f"{r[f'tp_{moe}_peak_bytes'] / 2**20:.0f} | {r[f'sp_{moe}_peak_bytes'] / 2**20:.0f} | "
                             f"{r[f'sp_{moe}_mem_over_tp_{moe}']:.3f} |")
        lines.append("")
        if kind == "prefill":
            lines += ["One MoE layer's parts alone (ms): MLA (with its collectives) / MoE block (router, experts, "
                      "collectives)", "", "| t | tokens | MoE mode | TP MLA | SP MLA | TP MoE | SP MoE |",
                      "|---|---|---|---|---|---|---|"]
            for r in rows:
                for moe in ("tp", "ep"):
                    lines.append(f"| {r['tp']} | {r['tokens']} | {moe} | {r[f'tp_{moe}_mla_ms']:.2f} | "
                                 f"{r[f'sp_{moe}_mla_ms']:.2f} | {r[f'tp_{moe}_moe_ms']:.2f} | {r[f'sp_{moe}_moe_ms']:.2f} |")
            lines.append("")
        lines += ["Routing (first MoE layer, all tokens): tokens per expert " + "; ".join(
            f"T={r['tokens']}: min {r['routing']['min']}, mean {r['routing']['mean']:.0f}, max {r['routing']['max']} "
            f"(max/mean {r['routing']['max_over_mean']:.2f}, empty {r['routing']['empty']})"
            for r in rows if r["tp"] == rows[0]["tp"]) + f". Grouped GEMM (torch._grouped_mm): {rows[0]['grouped_mm']}.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", default="4,2")
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--train-tokens", default="", help="e.g. 4096 (forward + backward)")
    parser.add_argument("--train-tp", default="4", help="t values for training (t = 2 does not fit: see docs)")
    parser.add_argument("--layers", type=int, default=4, help="1 dense + (layers - 1) MoE layers")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--bias-std", type=float, default=0.01, help="spread of the random routing bias")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU / gloo smoke run)")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from sp_core.mpu import platform

    gpus = platform.device_count() if platform.device_type() != "cpu" else 64
    results = {"device": (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
                          else "cpu"), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["python"] + sys.argv), "layers": args.layers,
               "shape": dict(V3, **(TINY if args.tiny else {})), "prefill": [], "train": []}

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(results))

    for t in (int(x) for x in args.tp.split(",")):
        if t > gpus:
            print(f"skip t={t}: {gpus} GPUs", flush=True)
            continue
        for kind, tokens, train in (("prefill", args.tokens, False), ("train", args.train_tokens, True)):
            if not tokens or (train and str(t) not in args.train_tp.split(",")):
                continue
            print(f"{kind} t={t} tokens={tokens}", flush=True)
            try:
                results[kind] += bench(t, args.layers, [int(x) for x in tokens.split(",")], args.iters, train,
                                       args.tiny, args.bias_std)
            except Exception as exc:  # keep what was measured (e.g. out of memory at t = 2)
                last = [line for line in str(exc).splitlines() if line.strip()][-1][:300]
                print(f"{kind} t={t} failed: {last}", flush=True)
                results.setdefault("failed", []).append(f"{kind} t={t}: {last}")
            save()
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
