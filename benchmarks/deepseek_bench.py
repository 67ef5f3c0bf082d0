"""GPU benchmark: DeepSeek-V3-shaped layers, TP (all-reduce) against TP-SP gathering the latent (the
core's MLA) and TP-SP gathering the 7168-wide hidden state before MLA (TorchTitan's plan, sglang's
layernorm-SP style), each with MoE mode (a) TP-sharded experts and (b) expert parallelism; the V3.2
indexer replicated (every rank scores every query row) against split by query rows (the core's); the
physical floor; the crossover token count. Same output format as benchmarks.bench: JSON + Markdown (+ PNG)
under --out.

    python -m benchmarks.deepseek_bench --tp 4,2 --tokens 2048,4096,8192,32768 --out $OUT

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

import torch
import torch.nn.functional as F

from benchmarks.common import (DEEPSEEK_V3, ceilings, deepseek_v3_config, deepseek_v3_shape, header,
                               kernel_categories, plot_ratios, random_deepseek_stack, save_results, timed)


def _device() -> str:
    from sp_core.mpu import platform

    return platform.device_type()


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
    from sp_core.kernels import lookup

    experts = next(layer for layer in stack if layer.is_moe).mlp.experts
    w = experts.gate_up_proj
    return lookup.grouped_mm_supports(torch.empty(16, w.shape[2], device=w.device, dtype=w.dtype), w)


def hidden_gather_attention(mla, hidden, positions, batch):
    """TP-SP with the hidden state gathered before MLA (the variant the core does not use): g on the
    7168-wide normed hidden state, the down-projections and latent norms on all tokens (every rank
    repeats them), the head-sharded up-projections and attention, then g-bar after o_proj."""
    from sp_core import mpu

    x = mpu.gather_from_sp(hidden)
    latent = mla.latent(x, positions)
    q_lat, kv_lat, k_pe = latent.split(mla.latent_widths, dim=-1)
    q = F.linear(q_lat, mla.q_b_proj.weight).unflatten(-1, (mla.num_local_heads, mla.qk_head_dim))
    q_nope, q_pe = q.split([mla.nope, mla.rope], dim=-1)
    out = mla.attend(q_nope, mla.rotary.rotate(positions, q_pe), F.linear(kv_lat, mla.kv_b_proj.weight), k_pe, batch)
    return mpu.reduce_scatter_to_sp(F.linear(out.flatten(-2), mla.o_proj.weight))


def _layer_forward(layer, hidden, positions, batch, num_tokens, hidden_gather: bool):
    """DeepseekDecoderLayer.forward, with the attention swapped for ``hidden_gather_attention`` if asked."""
    if not hidden_gather:
        return layer(hidden, positions, batch, num_tokens)
    attn = hidden_gather_attention(layer.self_attn, layer.input_layernorm(hidden), positions, batch)
    normed, hidden = layer.post_attention_layernorm(attn, hidden)
    return hidden + (layer.mlp(normed, num_tokens) if layer.is_moe else layer.mlp(normed))


# (label, SP on, hidden gathered before MLA)
VARIANTS = (("tp", False, False), ("sp", True, False), ("sph", True, True))
VARIANT_NAMES = {"tp": "TP", "sp": "TP-SP, latent gather", "sph": "TP-SP, hidden gather"}
CATEGORIES = (("collective", ("nccl", "memcpy", "cross_device", "all_to_all", "alltoall")),
              ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "splitk", "grouped")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
              ("norm+rotary", ("rms", "norm", "rope")),
              ("routing", ("topk", "sort", "radix", "sigmoid", "index", "scatter", "gather", "cumsum", "bincount",
                           "histc", "masked")))


def model_flops(T: int, t: int, layers: int, train: bool) -> float:
    """GEMM + attention FLOPs per rank of 1 dense + (layers - 1) MoE layers, each piece split over t."""
    S = DEEPSEEK_V3
    H, heads, nope, rope, v = S["hidden_size"], S["num_attention_heads"], S["qk_nope_head_dim"], S["qk_rope_head_dim"], S["v_head_dim"]
    q_lora, kv_lora, I, E, k = S["q_lora_rank"], S["kv_lora_rank"], S["moe_intermediate_size"], S["n_routed_experts"], S["num_experts_per_tok"]
    mla = 2 * T * (H * (q_lora + kv_lora + rope) + q_lora * heads * (nope + rope) + kv_lora * heads * (nope + v)
                   + heads * v * H) + T * T * heads * (nope + rope + v)  # causal: half of 2 * T^2 per product
    dense = 2 * T * 3 * H * S["intermediate_size"]
    moe = 2 * T * (k * 3 * H * I + S["n_shared_experts"] * 3 * H * I + H * E)
    return (3 if train else 1) * (layers * mla + dense + (layers - 1) * moe) / t


def comm_bus_bytes(T: int, t: int, layers: int, train: bool) -> float:
    """Bus bytes per rank of the latent-gather design with MoE mode (a): per layer one all-gather of the
    2112-wide latent and one reduce-scatter of the hidden state (MLA), one all-gather (hidden + routing)
    and one reduce-scatter of the hidden state (MLP / MoE); bf16. Training: x3 (forward, backward)."""
    S = DEEPSEEK_V3
    H, latent = S["hidden_size"], S["q_lora_rank"] + S["kv_lora_rank"] + S["qk_rope_head_dim"]
    per_layer = T * 2 * (latent + H) + T * 2 * (H + H)
    routing = (layers - 1) * T * S["num_experts_per_tok"] * 8
    return (3 if train else 1) * (layers * per_layer + routing) * (t - 1) / t


def _indexer_rank(tokens_list, iters: int, tiny: bool) -> list:
    """The V3.2 indexer alone: replicated (SP off, every rank scores all T query rows; the scoring of
    sglang and Megatron) against split by query rows (SP on, the core's: own rows, then the int32
    selection all-gathered). V3.2's sizes: 64 heads of 128, rope 64, top-2048."""
    from sp_core import mpu
    from sp_core.layers import PackedBatch
    from sp_core.layers.indexer import LightningIndexer

    shape = deepseek_v3_shape(tiny)
    device, t = _device(), mpu.default_context().size
    heads, dim, topk = (4, 32, 64) if tiny else (64, 128, 2048)
    torch.manual_seed(0)
    with torch.device(device):
        indexer = LightningIndexer(shape["hidden_size"], shape["q_lora_rank"], heads, dim, shape["qk_rope_head_dim"],
                                   topk, shape["rope_theta"], shape["rope_scaling"], dtype=torch.bfloat16)
    rows = []
    for T in tokens_list:
        if T <= topk:
            continue  # every row keeps all its keys: the indexer does nothing
        gen = torch.Generator().manual_seed(T)
        hidden = torch.randn(T, shape["hidden_size"], generator=gen).to(device, torch.bfloat16)
        q_lat = torch.randn(T, shape["q_lora_rank"], generator=gen).to(device, torch.bfloat16)
        positions, batch = torch.arange(T, device=device), PackedBatch([T])
        row = {"tokens": T, "tp": t}
        for label, sp in (("replicated", False), ("split", True)):
            with mpu.default_context().sequence_parallel_for(sp):
                part = (lambda x: x.chunk(t)[mpu.default_context().rank]) if sp else (lambda x: x)
                args = (part(hidden), part(q_lat), part(positions), batch)
                row[f"{label}_ms"], row[f"{label}_peak_bytes"] = timed(lambda: indexer(*args), iters, warmup=1)
        row["split_over_replicated"] = row["split_ms"] / row["replicated_ms"]
        rows.append(row)
    return rows


def _bench_rank(layers: int, tokens_list, iters: int, train: bool, tiny: bool, bias_std: float,
                profile_tokens=(), indexer_tokens=()):
    from sp_core import mpu
    from sp_core.layers import PackedBatch

    device, dtype = _device(), torch.bfloat16
    t = mpu.default_context().size
    rows = {T: {"tokens": T, "tp": t, "train": train} for T in tokens_list}
    for moe in ("tp", "ep"):
        cfg = deepseek_v3_config(layers, tiny, moe)
        stack = random_deepseek_stack(cfg, dtype, device, bias_std)
        if moe == "tp":
            for T in tokens_list:
                x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(device, dtype)
                rows[T]["routing"] = _routing_stats(stack, x)
            grouped = _grouped_mm_used(stack)
        for T in tokens_list:
            positions = torch.arange(T, device=device)
            batch = PackedBatch([T])
            x_full = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(device, dtype)
            for mode, sp, hidden_gather in VARIANTS:
                with mpu.default_context().sequence_parallel_for(sp):
                    x = x_full.chunk(t)[mpu.default_context().rank].contiguous() if sp else x_full
                    x.requires_grad_(train)
                    grad = torch.randn_like(x)

                    def run():
                        h = x
                        for layer in stack:
                            h = _layer_forward(layer, h, positions, batch, T, hidden_gather)
                        if train:
                            h.backward(grad)

                    with torch.set_grad_enabled(train):
                        ms, peak = timed(run, iters, warmup=2)
                        if T in profile_tokens and device == "cuda":
                            rows[T][f"{mode}_{moe}_kernels"] = kernel_categories(run, categories=CATEGORIES)
                    for p in stack.parameters():
                        p.grad = None
                    rows[T][f"{mode}_{moe}_ms"], rows[T][f"{mode}_{moe}_peak_bytes"] = ms, peak
                    if not train:  # where the time goes: one MoE layer's MLA and MoE block alone
                        moe_layer = stack[-1]
                        with torch.no_grad():
                            normed = moe_layer.input_layernorm(x)
                            attention = (lambda: hidden_gather_attention(moe_layer.self_attn, normed, positions, batch)) \
                                if hidden_gather else (lambda: moe_layer.self_attn(normed, positions, batch))
                            rows[T][f"{mode}_{moe}_mla_ms"] = timed(attention, iters, warmup=2)[0]
                            rows[T][f"{mode}_{moe}_moe_ms"] = timed(lambda: moe_layer.mlp(normed, T), iters, warmup=2)[0]
                    if mpu.default_context().rank == 0:
                        print(f"  t={t} T={T} {'train' if train else 'prefill'} {mode} moe={moe}: {ms:.2f} ms, "
                              f"peak {peak / 2**20:.0f} MiB", flush=True)
        del stack
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tflops, busbw = None, None
    if device == "cuda":
        tflops, busbw = ceilings()
    for r in rows.values():
        r["grouped_mm"] = grouped
        r["weights_note"] = "peak = activations + workspace above the resident weights"
        base = min(r["tp_tp_ms"], r["tp_ep_ms"])
        for moe in ("tp", "ep"):
            for mode in ("sp", "sph"):
                r[f"{mode}_{moe}_over_tp_{moe}"] = r[f"{mode}_{moe}_ms"] / r[f"tp_{moe}_ms"]
                r[f"{mode}_{moe}_over_best_tp"] = r[f"{mode}_{moe}_ms"] / base
                r[f"{mode}_{moe}_mem_over_tp_{moe}"] = r[f"{mode}_{moe}_peak_bytes"] / max(1, r[f"tp_{moe}_peak_bytes"])
        if tflops:
            T = r["tokens"]
            r.update(matmul_tflops=tflops, busbw_gbs=busbw,
                     floor_compute_ms=model_flops(T, t, layers, train) / (tflops * 1e12) * 1e3,
                     floor_comm_ms=comm_bus_bytes(T, t, layers, train) / (busbw * 1e9) * 1e3)
            r["floor_ms"] = r["floor_compute_ms"] + r["floor_comm_ms"]
            best_sp = min(r["sp_tp_ms"], r["sp_ep_ms"])
            r["best_sp_over_floor"], r["best_tp_over_floor"] = best_sp / r["floor_ms"], base / r["floor_ms"]
    out = {"rows": list(rows.values())}
    if indexer_tokens:
        out["indexer"] = _indexer_rank(indexer_tokens, iters, tiny)
    return out


def bench(tp: int, layers: int, tokens_list, iters: int, train: bool, tiny: bool, bias_std: float,
          profile_tokens=(), indexer_tokens=()):
    from sp_core.procs.launch import run_ranks

    return run_ranks(tp, _bench_rank, layers, tokens_list, iters, train, tiny, bias_std, tuple(profile_tokens),
                     tuple(indexer_tokens), timeout=900)[0]


def crossover(rows) -> dict:
    """Per t and MoE mode: the smallest measured token count from which the latent-gather TP-SP is not
    slower than the best TP mode at that size and every larger measured size (None: never)."""
    out = {}
    for t in sorted({r["tp"] for r in rows}):
        mine = sorted((r for r in rows if r["tp"] == t), key=lambda r: r["tokens"])
        for moe in ("tp", "ep"):
            wins = [r[f"sp_{moe}_over_best_tp"] <= 1.0 for r in mine]
            first = next((i for i in range(len(mine)) if all(wins[i:])), None)
            out[f"t{t}_{moe}"] = mine[first]["tokens"] if first is not None else None
    return out


def markdown(results: dict) -> str:
    lines = [f"Card: {results['device']}; torch {results['torch']}; {results['date']}; "
             f"command: `{results['command']}`", ""]
    for kind, title in (("prefill", "Prefill (no grad, one packed sequence)"), ("train", "Training (forward + backward)")):
        rows = results.get(kind) or []
        if not rows:
            continue
        lines += [f"### {title}, {results['layers']} layers (1 dense + {results['layers'] - 1} MoE)", "",
                  "| t | tokens | MoE mode | TP ms | SP latent ms | SP hidden ms | latent/TP | hidden/TP | latent / best TP | "
                  "TP peak MiB | latent peak MiB | hidden peak MiB | latent/TP memory | hidden/TP memory | floor ms | "
                  "best SP / floor |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for moe, name in (("tp", "(a) TP-sharded"), ("ep", "(b) EP")):
                floor = (f"{r['floor_ms']:.2f} | {r['best_sp_over_floor']:.2f}" if "floor_ms" in r else "- | -")
                lines.append(f"| {r['tp']} | {r['tokens']} | {name} | {r[f'tp_{moe}_ms']:.2f} | {r[f'sp_{moe}_ms']:.2f} | "
                             f"{r[f'sph_{moe}_ms']:.2f} | **{r[f'sp_{moe}_over_tp_{moe}']:.3f}** | "
                             f"{r[f'sph_{moe}_over_tp_{moe}']:.3f} | {r[f'sp_{moe}_over_best_tp']:.3f} | "
                             f"{r[f'tp_{moe}_peak_bytes'] / 2**20:.0f} | {r[f'sp_{moe}_peak_bytes'] / 2**20:.0f} | "
                             f"{r[f'sph_{moe}_peak_bytes'] / 2**20:.0f} | {r[f'sp_{moe}_mem_over_tp_{moe}']:.3f} | "
                             f"{r[f'sph_{moe}_mem_over_tp_{moe}']:.3f} | {floor} |")
        lines.append("")
        if kind == "prefill":
            lines += ["One MoE layer's parts alone (ms): MLA (with its collectives) / MoE block (router, experts, "
                      "collectives)", "", "| t | tokens | MoE mode | TP MLA | SP latent MLA | SP hidden MLA | TP MoE | SP MoE |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                for moe in ("tp", "ep"):
                    lines.append(f"| {r['tp']} | {r['tokens']} | {moe} | {r[f'tp_{moe}_mla_ms']:.2f} | "
                                 f"{r[f'sp_{moe}_mla_ms']:.2f} | {r[f'sph_{moe}_mla_ms']:.2f} | "
                                 f"{r[f'tp_{moe}_moe_ms']:.2f} | {r[f'sp_{moe}_moe_ms']:.2f} |")
            lines.append("")
        profiled = [(r, moe, mode) for r in rows for moe in ("tp", "ep") for mode in ("tp", "sp", "sph")
                    if f"{mode}_{moe}_kernels" in r]
        if profiled:
            cats = [c for c, _ in CATEGORIES] + ["other"]
            lines += [f"Kernel time by category, ms per call, rank 0 ({kind}; collectives include waiting):", "",
                      "| t | tokens | MoE | variant | wall ms | " + " | ".join(cats) + " |",
                      "|---|---|---|---|---|" + "---|" * len(cats)]
            for r, moe, mode in profiled:
                k = r[f"{mode}_{moe}_kernels"]
                lines.append(f"| {r['tp']} | {r['tokens']} | {moe} | {VARIANT_NAMES[mode]} | {r[f'{mode}_{moe}_ms']:.2f} | "
                             + " | ".join(f"{k[c]:.2f}" for c in cats) + " |")
            lines.append("")
        lines += ["Routing (first MoE layer, all tokens): tokens per expert " + "; ".join(
            f"T={r['tokens']}: min {r['routing']['min']}, mean {r['routing']['mean']:.0f}, max {r['routing']['max']} "
            f"(max/mean {r['routing']['max_over_mean']:.2f}, empty {r['routing']['empty']})"
            for r in rows if r["tp"] == rows[0]["tp"]) + f". Grouped GEMM (torch._grouped_mm): {rows[0]['grouped_mm']}.", ""]
        if "floor_ms" in rows[0]:
            lines += ["Measured ceilings: " + "; ".join(f"t={r['tp']}: {r['matmul_tflops']:.0f} TFLOP/s, "
                                                       f"{r['busbw_gbs']:.0f} GB/s" for r in rows if r is rows[0] or r["tp"] != rows[0]["tp"]), ""]
    if results.get("crossover"):
        lines += ["Crossover (smallest measured T from which latent-gather TP-SP <= best TP at every larger size): "
                  + ", ".join(f"{k}: {v}" for k, v in results["crossover"].items()), ""]
    rows = results.get("indexer") or []
    if rows:
        lines += ["### V3.2 indexer alone: replicated (every rank scores all rows) vs split by query rows", "",
                  "| t | tokens | replicated ms | split ms | split / replicated | replicated peak MiB | split peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['tp']} | {r['tokens']} | {r['replicated_ms']:.2f} | {r['split_ms']:.2f} | "
                         f"**{r['split_over_replicated']:.3f}** | {r['replicated_peak_bytes'] / 2**20:.0f} | "
                         f"{r['split_peak_bytes'] / 2**20:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    def curves(ax, t, rows):
        tokens = [r["tokens"] for r in rows]
        for moe, marker in (("tp", "o"), ("ep", "s")):
            line, = ax.plot(tokens, [r[f"sp_{moe}_over_tp_{moe}"] for r in rows], marker=marker,
                            label=f"t={t} MoE {moe}: latent SP / TP")
            ax.plot(tokens, [r[f"sph_{moe}_over_tp_{moe}"] for r in rows], marker=marker, ls="--",
                    color=line.get_color(), label=f"t={t} MoE {moe}: hidden SP / TP")

    return plot_ratios(results, path, curves, "DeepSeek-V3 layers, ", figsize=(11, 4), legend_fontsize=6,
                       guides=(1.0, 0.9))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", default="4,2")
    parser.add_argument("--tokens", default="2048,4096,8192,32768")
    parser.add_argument("--train-tokens", default="", help="e.g. 4096,8192 (forward + backward)")
    parser.add_argument("--train-tp", default="4,2", help="t values for training (t = 2 needs more than 80 GB)")
    parser.add_argument("--layers", type=int, default=4, help="1 dense + (layers - 1) MoE layers")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--bias-std", type=float, default=0.01, help="spread of the random routing bias")
    parser.add_argument("--profile-tokens", default="", help="token counts to profile by kernel category")
    parser.add_argument("--indexer-tokens", default="", help="token counts for the V3.2 indexer alone (prefill)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU / gloo smoke run)")
    parser.add_argument("--out", default="out")
    parser.add_argument("--plot-only", default=None, help="re-plot a results.json")
    args = parser.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.join(os.path.dirname(args.plot_only), "deepseek.png"))
        return
    os.makedirs(args.out, exist_ok=True)
    from sp_core.mpu import platform

    gpus = platform.device_count() if platform.device_type() != "cpu" else 64
    results = header(layers=args.layers, shape=deepseek_v3_shape(args.tiny), prefill=[], train=[], indexer=[])
    profile = [int(x) for x in args.profile_tokens.split(",") if x]

    def save():
        results["crossover"] = crossover(results["prefill"])
        save_results(args.out, results, markdown(results))

    for t in (int(x) for x in args.tp.split(",")):
        if t > gpus:
            print(f"skip t={t}: {gpus} GPUs", flush=True)
            continue
        for kind, tokens, train in (("prefill", args.tokens, False), ("train", args.train_tokens, True)):
            if not tokens or (train and str(t) not in args.train_tp.split(",")):
                continue
            print(f"{kind} t={t} tokens={tokens}", flush=True)
            indexer = [int(x) for x in args.indexer_tokens.split(",") if x] if not train else []
            try:
                out = bench(t, args.layers, [int(x) for x in tokens.split(",")], args.iters, train, args.tiny,
                            args.bias_std, profile, indexer)
                results[kind] += out["rows"]
                results["indexer"] += out.get("indexer", [])
            except Exception as exc:  # keep what was measured (e.g. out of memory)
                last = [line for line in str(exc).splitlines() if line.strip()][-1][:300]
                print(f"{kind} t={t} failed: {last}", flush=True)
                results.setdefault("failed", []).append(f"{kind} t={t}: {last}")
            save()
    save()
    plot(results, os.path.join(args.out, "deepseek.png"))
    print(markdown(results))


if __name__ == "__main__":
    main()
