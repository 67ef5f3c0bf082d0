"""GPU benchmarks: TP vs TP-SP in the core (prefill and training), and the core inside Megatron vs
megatron-core's own GPTModel with sequence_parallel. One command per machine does the whole
measurement and writes JSON + Markdown (+ PNG when matplotlib is there) under --out.

    python -m benchmarks.bench --tp 2,4 --tokens 2048,8192,32768 --out $OUT

Shapes: Qwen3-8B-like layers (hidden 4096, 32 heads, 8 KV heads, head_dim 128, FFN 12288), random
bf16 weights, a few layers. Median of --iters timed with device events after warm-up.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from benchmarks import megatron_bench
from benchmarks.common import (CATEGORY_NAMES, SHAPE, ceilings, header, host_side, kernel_categories,
                               context, plot_ratios, random_qwen3_stack, save_results, timed)
from sp_core.mpu import async_tp


def layer_flops(tokens: int, t: int, layers: int) -> float:
    h, q, kv, d, f = (SHAPE["hidden_size"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"],
                      SHAPE["head_dim"], SHAPE["intermediate_size"])
    gemm = 2 * tokens * (h * (q + 2 * kv) * d + q * d * h + 3 * h * f) / t
    attention = 2 * 2 * tokens * tokens / 2 * q * d / t  # causal: half of QK^T and PV
    return layers * (gemm + attention)


def comm_bus_bytes(tokens: int, t: int, layers: int) -> float:
    """Bus bytes per rank: two all-reduces per layer (TP) = two all-gathers + two reduce-scatters (SP)."""
    size = tokens * SHAPE["hidden_size"] * 2
    return layers * 2 * size * 2 * (t - 1) / t


# (label, SP on, environment): "old" is the core's first path (pure-torch norm with a float32 round
# trip, float32 rotary, unfused collectives); "strong" the fused norm / rotary kernels; "async" adds
# the fused all-gather+GEMM / GEMM+reduce-scatter where sp_core.mpu.async_tp's table says they pay.
VARIANTS = (("old_tp", False, dict(SP_CORE_FUSED="0", SP_CORE_ASYNC_TP="off")),
            ("old_sp", True, dict(SP_CORE_FUSED="0", SP_CORE_ASYNC_TP="off")),
            ("tp", False, dict(SP_CORE_FUSED="1", SP_CORE_ASYNC_TP="off")),
            ("sp", True, dict(SP_CORE_FUSED="1", SP_CORE_ASYNC_TP="off")),
            ("async_sp", True, dict(SP_CORE_FUSED="1", SP_CORE_ASYNC_TP="auto")))

def _bench_core_rank(layers: int, tokens_list, iters: int, train: bool, profile_tokens=(), variants=None,
                     async_tp_form: str = "auto"):
    from sp_core import mpu
    from sp_core.layers import PackedBatch
    from sp_core.mpu import platform

    device = platform.current_device()
    tflops, busbw = ceilings()
    t = mpu.default_context().size
    rows = []
    for tokens in tokens_list:
        positions = torch.arange(tokens, device=device)
        batch = PackedBatch([tokens])
        result = {"tokens": tokens, "tp": t}
        for label, sp, env in VARIANTS:
            if variants is not None and label not in variants:
                result[f"{label}_ms"] = result[f"{label}_peak_bytes"] = float("nan")  # not run
                continue
            env = dict(env, SP_CORE_ASYNC_TP=async_tp_form) if label == "async_sp" else env
            cfg, stack = random_qwen3_stack(layers, parallel=context(env, sequence_parallel=sp))  # same seed
            n = tokens // t if sp else tokens
            x = torch.randn(n, cfg.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=train)
            grad = torch.randn_like(x)

            def run():
                h = x
                for layer in stack:
                    h = layer(h, positions, batch)
                if train:
                    h.backward(grad)

            with torch.set_grad_enabled(train):
                ms, peak = timed(run, iters)
                if tokens in profile_tokens and label in ("tp", "sp", "async_sp"):
                    result[f"{label}_kernels"] = kernel_categories(run)
                    result[f"{label}_host"] = host_side(run)
            for p in stack.parameters():
                p.grad = None
            result[f"{label}_ms"], result[f"{label}_peak_bytes"] = ms, peak
        passes = 3 if train else 1
        compute_ms = passes * layer_flops(tokens, t, layers) / (tflops * 1e12) * 1e3
        comm_ms = passes * comm_bus_bytes(tokens, t, layers) / (busbw * 1e9) * 1e3
        result.update(old_sp_over_tp=result["old_sp_ms"] / result["old_tp_ms"],
                      sp_over_tp=result["sp_ms"] / result["tp_ms"],
                      async_sp_over_tp=result["async_sp_ms"] / result["tp_ms"],
                      floor_ms=compute_ms + comm_ms, floor_compute_ms=compute_ms, floor_comm_ms=comm_ms,
                      matmul_tflops=tflops, busbw_gbs=busbw)
        result["sp_over_floor"] = result["async_sp_ms"] / result["floor_ms"]
        result["tp_over_floor"] = result["tp_ms"] / result["floor_ms"]
        rows.append(result)
        torch.cuda.empty_cache()
    return rows


def bench_core(tp: int, layers: int, tokens_list, iters: int, train: bool, profile_tokens=(), variants=None,
               async_tp_form: str = "auto"):
    from sp_core.procs.launch import run_ranks

    return run_ranks(tp, _bench_core_rank, layers, tokens_list, iters, train, tuple(profile_tokens), variants,
                     async_tp_form, timeout=900)[0]


def markdown(results: dict) -> str:
    lines = [f"Card: {results['device']}; torch {results['torch']}; {results['date']}; "
             f"command: `{results['command']}`", ""]
    for kind, title in (("prefill", "Prefill (no grad, packed batch)"), ("train", "Training (forward + backward)")):
        rows = results.get(kind) or []
        if not rows:
            continue
        lines += [f"### {title}, {results['layers']} layers", "",
                  "| t | tokens | old TP ms | old TP-SP ms | old SP/TP | strong TP ms | strong TP-SP ms | SP/TP | "
                  "TP-SP + async TP ms | **(SP + async) / strong TP** | SP/TP memory | floor ms | (SP + async) / floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['tp']} | {r['tokens']} | {r['old_tp_ms']:.2f} | {r['old_sp_ms']:.2f} | "
                         f"{r['old_sp_over_tp']:.3f} | {r['tp_ms']:.2f} | {r['sp_ms']:.2f} | {r['sp_over_tp']:.3f} | "
                         f"{r['async_sp_ms']:.2f} | **{r['async_sp_over_tp']:.3f}** | "
                         f"{r['async_sp_peak_bytes'] / max(r['tp_peak_bytes'], 1):.3f} | {r['floor_ms']:.2f} | "
                         f"{r['sp_over_floor']:.2f} |")
        lines.append("")
        profiled = [r for r in rows if "tp_kernels" in r]
        if profiled:
            lines += [f"Kernel time by category, ms per call on rank 0 ({kind}; sums can exceed the wall time "
                      "where collectives overlap GEMMs):", "",
                      "| t | tokens | variant | wall ms | " + " | ".join(results["categories"]) + " |",
                      "|---|---|---|---|" + "---|" * len(results["categories"])]
            for r in profiled:
                for label in (v for v in ("tp", "sp", "async_sp") if f"{v}_kernels" in r):
                    k = r[f"{label}_kernels"]
                    lines.append(f"| {r['tp']} | {r['tokens']} | {label} | {r[f'{label}_ms']:.2f} | "
                                 + " | ".join(f"{k[c]:.2f}" for c in results["categories"]) + " |")
            lines.append("")
            hosted = [(r, v) for r in profiled for v in ("tp", "sp", "async_sp") if f"{v}_host" in r]
            if hosted:
                lines += ["Host side (rank 0): milliseconds to enqueue one call, and host syncs inside it:", "",
                          "| t | tokens | variant | wall ms | enqueue ms | host syncs | first sync |", "|---|---|---|---|---|---|---|"]
                for r, v in hosted:
                    h = r[f"{v}_host"]
                    lines.append(f"| {r['tp']} | {r['tokens']} | {v} | {r[f'{v}_ms']:.2f} | {h['enqueue_ms']:.2f} | "
                                 f"{h['host_syncs']} | {h['first_sync']} |")
                lines.append("")
    rows = results.get("megatron") or []
    if rows:
        lines += [f"### Training inside Megatron, {results['layers']} layers", "",
                  "| t | tokens | Megatron-native SP ms | sp-core in Megatron ms | ratio | native peak MiB | sp-core peak MiB | memory ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['tp']} | {r['tokens']} | {r['native_ms']:.2f} | {r['core_ms']:.2f} | "
                         f"{r['core_ms'] / r['native_ms']:.3f} | {r['native_peak_bytes'] / 2**20:.0f} | "
                         f"{r['core_peak_bytes'] / 2**20:.0f} | {r['core_peak_bytes'] / r['native_peak_bytes']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    series = (("async_sp_over_tp", "o", "-", "(SP + async TP) / strong TP"), ("sp_over_tp", "s", ":", "SP / strong TP"),
              ("old_sp_over_tp", "x", "--", "old SP / old TP"))

    def curves(ax, t, rows):
        color = None
        for key, marker, style, label in series:  # variants not run (--variants) are nan: not drawn
            points = [(r["tokens"], r[key]) for r in rows if math.isfinite(r[key])]
            if points:
                line, = ax.plot(*zip(*points), marker=marker, ls=style, color=color, label=f"t={t}: {label}")
                color = line.get_color()

    return plot_ratios(results, path, curves)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", default="2,4")
    parser.add_argument("--tokens", default="2048,8192,32768")
    parser.add_argument("--train-tokens", default="2048,8192")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--megatron", action="store_true", help="also compare with megatron-core's own SP")
    parser.add_argument("--only-megatron", action="store_true", help="skip the core's TP vs TP-SP runs")
    parser.add_argument("--profile-tokens", default="", help="token counts to profile by kernel category")
    parser.add_argument("--variants", default=",".join(v for v, _, _ in VARIANTS),
                        help="which of the core's variants to time (the others are reported as nan)")
    parser.add_argument("--async-tp", default="auto", choices=("auto",) + async_tp.IMPLS,
                        help="what the async_sp variant runs: the decision table (auto) or one form everywhere")
    parser.add_argument("--out", default="out")
    parser.add_argument("--plot-only", default=None, help="re-plot a results.json")
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - {v for v, _, _ in VARIANTS})
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose among {[v for v, _, _ in VARIANTS]}")
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.join(os.path.dirname(args.plot_only), "benchmarks.png"))
        return
    os.makedirs(args.out, exist_ok=True)
    tps = [int(x) for x in args.tp.split(",")]
    results = header(layers=args.layers, shape=SHAPE, prefill=[], train=[], megatron=[],
                     categories=CATEGORY_NAMES, variants=args.variants.split(","),
                     async_tp_table=async_tp.TABLE, async_tp=args.async_tp)
    for t in tps:
        if t > torch.cuda.device_count():
            print(f"skip t={t}: {torch.cuda.device_count()} GPUs", flush=True)
            continue
        for kind, tokens, train in (() if args.only_megatron else
                                    (("prefill", args.tokens, False), ("train", args.train_tokens, True))):
            profile = [int(x) for x in args.profile_tokens.split(",") if x]
            tokens_list = [int(x) for x in tokens.split(",") if x]
            if not tokens_list:
                continue
            rows = bench_core(t, args.layers, tokens_list, args.iters, train, profile, args.variants.split(","),
                              args.async_tp)
            results[kind] += rows
            for r in rows:
                print(f"{kind} t={t} T={r['tokens']}: old TP {r['old_tp_ms']:.2f} SP {r['old_sp_ms']:.2f} "
                      f"({r['old_sp_over_tp']:.3f}); strong TP {r['tp_ms']:.2f} SP {r['sp_ms']:.2f} "
                      f"({r['sp_over_tp']:.3f}); SP+async {r['async_sp_ms']:.2f} ({r['async_sp_over_tp']:.3f}); "
                      f"floor {r['floor_ms']:.2f}", flush=True)
        if args.megatron:
            rows = megatron_bench.run(t, args.layers, [int(x) for x in args.train_tokens.split(",")], args.iters)
            results["megatron"] += rows
            for r in rows:
                print(f"megatron t={t} T={r['tokens']}: native {r['native_ms']:.2f} ms, core {r['core_ms']:.2f} ms "
                      f"({r['core_ms'] / r['native_ms']:.3f}), mem {r['core_peak_bytes'] / r['native_peak_bytes']:.3f}",
                      flush=True)
    md = markdown(results)
    save_results(args.out, results, md)
    plot(results, os.path.join(args.out, "benchmarks.png"))
    print(md)


if __name__ == "__main__":
    main()
