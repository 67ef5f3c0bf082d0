"""GPU check and speed of the deterministic mode's one-launch batch-invariant GEMM
(sp_core/kernels/triton_batch_invariant.py), one command, bfloat16:

    source benchmarks/device_setup.sh
    python -m benchmarks.batch_invariant_bench --tp 2,4 --out $OUT

1. invariance on one GPU: Qwen3-8B-shaped weights, x of 8192 rows; for windows of M = 1 .. 8192 rows at
   several offsets, ``kernel(x[o:o + M]) == kernel(x)[o:o + M]`` with ``torch.equal`` (bf16 on four
   shapes, among them a K tail and the small-N tile; fp16 and fp32 on one each), the same windows with
   torch.matmul (cuBLAS) for contrast, and each one's largest error against a float64 product (fp32:
   the kernel must not use TF32);
2. speed on one GPU: the kernel vs torch.matmul (cuBLAS) vs the blocked path it replaces (128-row
   blocks) on the linears of a Qwen3-8B layer at t = 1, 2, 4 and M = 8192 tokens: ms, TFLOP/s, kernel /
   cuBLAS; and the kernel with other fixed tiles (SWEEP), to choose ``tiles_for``'s from;
3. the mode on the model (benchmarks/deterministic_bench.py's functions), SP on, NCCL, at each --tp:
   core engine vs Megatron engine ``torch.equal`` in the deterministic mode (tiny Qwen3, prompts of 1 to
   255 tokens), the core's prefill of a prompt alone vs inside 8 mixed requests, and the cost: 4
   Qwen3-8B-shaped layers, 8K-token prefill, deterministic / default with the kernel and with the
   blocked GEMMs.

Writes results.json, results.md and log.txt under --out; exit 1 if a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from benchmarks import deterministic_bench
from benchmarks.common import SHAPE, header, save_results, tee_log, timed

TOKENS = 8192
WINDOW_ROWS = (1, 2, 3, 5, 8, 16, 17, 31, 64, 100, 127, 128, 129, 255, 256, 1000, 1024, 2047, 4096, 5000,
               8191, 8192)
OFFSETS = (0, 1, 7, 64, 127, 128, 1000, 3001)
SWEEP = {"128x128x64 w4 s4": (128, 128, 64, 4, 4), "128x128x64 w8 s4": (128, 128, 64, 8, 4),
         "128x256x64 w8 s3": (128, 256, 64, 8, 3), "128x256x64 w8 s4": (128, 256, 64, 8, 4),
         "64x256x64 w4 s4": (64, 256, 64, 4, 4)}


def linears(t: int):
    """(name, N, K) of the GEMMs of one Qwen3-8B-shaped layer at tensor-parallel size t."""
    hidden, inter, heads = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_attention_heads"]
    q, kv = heads * SHAPE["head_dim"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    return [("qkv", (q + 2 * kv) // t, hidden), ("o", hidden, q // t), ("gate_up", 2 * inter // t, hidden),
            ("down", hidden, inter // t)]


def invariance(kernel, n: int, k: int, dtype, log) -> dict:
    """Every window of WINDOW_ROWS rows at OFFSETS against the full 8192-row product, kernel and cuBLAS."""
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(TOKENS, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    full, full_cublas = kernel(x, w.t()), x @ w.t()
    windows = kernel_differ = cublas_differ = 0
    for rows in WINDOW_ROWS:
        for offset in OFFSETS:
            if offset + rows > TOKENS:
                continue
            part = x[offset:offset + rows]
            windows += 1
            kernel_differ += not torch.equal(kernel(part, w.t()), full[offset:offset + rows])
            cublas_differ += not torch.equal(part @ w.t(), full_cublas[offset:offset + rows])
    exact = (x[:512].double() @ w.double().t())
    scale = exact.abs().max().item()
    row = dict(dtype=str(dtype).replace("torch.", ""), n=n, k=k, windows=windows, kernel_differ=kernel_differ,
               cublas_differ=cublas_differ,
               kernel_error=(full[:512].double() - exact).abs().max().item() / scale,
               cublas_error=(full_cublas[:512].double() - exact).abs().max().item() / scale)
    log(f"  {row['dtype']} N={n} K={k}: {windows} windows (M = 1 .. {TOKENS}, offsets {OFFSETS}): kernel "
        f"differs in {kernel_differ}, cuBLAS in {cublas_differ}; max error / max |y| vs float64: kernel "
        f"{row['kernel_error']:.2e}, cuBLAS {row['cublas_error']:.2e}")
    return row


def speed(kernel, t: int, iters: int, log) -> list:
    from sp_core.kernels import triton_batch_invariant as tbi
    from sp_core.kernels.batch_invariant import blocked_mm

    rows = []
    for name, n, k in linears(t):
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        flop = 2 * TOKENS * n * k
        row = dict(tp=t, linear=name, n=n, k=k)
        for label, fn in (("cublas", lambda: x @ w.t()), ("kernel", lambda: kernel(x, w.t())),
                          ("blocked", lambda: blocked_mm(x, w.t()))):
            row[f"{label}_ms"] = timed(fn, iters)[0]
            row[f"{label}_tflops"] = flop / row[f"{label}_ms"] / 1e9
        row["kernel_tiles"] = "x".join(map(str, tbi.tiles_for(torch.bfloat16, n, k)[:3]))
        row["sweep_ms"] = {name: timed(lambda: tbi.matmul(x, w.t(), tbi.Tiles(*tiles)), iters)[0]
                           for name, tiles in SWEEP.items()}
        row["kernel_over_cublas"] = row["kernel_ms"] / row["cublas_ms"]
        row["blocked_over_cublas"] = row["blocked_ms"] / row["cublas_ms"]
        log(f"  t={t} {name} M={TOKENS} N={n} K={k}: cuBLAS {row['cublas_ms']:.3f} ms "
            f"({row['cublas_tflops']:.0f} TFLOP/s), kernel {row['kernel_ms']:.3f} ms ({row['kernel_tflops']:.0f}), "
            f"blocked {row['blocked_ms']:.3f} ms; kernel / cuBLAS {row['kernel_over_cublas']:.3f}; other tiles: "
            + ", ".join(f"{name} {ms:.3f}" for name, ms in row["sweep_ms"].items()))
        rows.append(row)
    layer = {key: sum(r[f"{key}_ms"] for r in rows) for key in ("cublas", "kernel", "blocked")}
    log(f"  t={t} one layer's four GEMMs: kernel / cuBLAS {layer['kernel'] / layer['cublas']:.3f}, "
        f"blocked / cuBLAS {layer['blocked'] / layer['cublas']:.3f}")
    return rows


def markdown(results: dict) -> str:
    lines = [f"Card: {results['device']}; torch {results['torch']}; triton {results['triton']}; {results['date']}; "
             f"command: `{results['command']}`", "",
             f"**Batch invariance on one GPU: windows of M = 1 .. {TOKENS} rows at offsets "
             f"{', '.join(map(str, OFFSETS))} vs the full {TOKENS}-row product (`torch.equal`)**", "",
             "| dtype | N | K | windows | kernel: windows that differ | cuBLAS: windows that differ | "
             "kernel error | cuBLAS error |", "|---|---|---|---|---|---|---|---|"]
    for r in results["invariance"]:
        lines.append(f"| {r['dtype']} | {r['n']} | {r['k']} | {r['windows']} | **{r['kernel_differ']}** | "
                     f"{r['cublas_differ']} | {r['kernel_error']:.2e} | {r['cublas_error']:.2e} |")
    lines += ["", "(error: max |y - y_float64| / max |y_float64| over 512 rows)", "",
              f"**GEMM speed, bf16, M = {TOKENS} tokens, Qwen3-8B linears, median of {results['iters']}**", "",
              "| t | linear | N | K | cuBLAS ms | kernel ms | blocked ms | **kernel / cuBLAS** | blocked / cuBLAS |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["speed"]:
        lines.append(f"| {r['tp']} | {r['linear']} | {r['n']} | {r['k']} | {r['cublas_ms']:.3f} | "
                     f"{r['kernel_ms']:.3f} | {r['blocked_ms']:.3f} | **{r['kernel_over_cublas']:.3f}** | "
                     f"{r['blocked_over_cublas']:.3f} |")
    lines += ["", "**The kernel with other fixed tiles (ms; the kernel above uses `tiles_for`'s)**", "",
              "| t | linear | tiles_for | " + " | ".join(SWEEP) + " |", "|---|---|---|" + "---|" * len(SWEEP)]
    for r in results["speed"]:
        lines.append(f"| {r['tp']} | {r['linear']} | {r['kernel_tiles']} | "
                     + " | ".join(f"{r['sweep_ms'][name]:.3f}" for name in SWEEP) + " |")
    if results["equality"] or results["invariance_model"]:
        lines += ["", "**The mode on a tiny Qwen3, SP on, bf16**", "",
                  "| t | core vs Megatron engine `torch.equal` | prefill alone == inside 8 requests |", "|---|---|---|"]
        for t in sorted({r["tp"] for r in results["equality"] + results["invariance_model"]}):
            eq = [r["equal"] for r in results["equality"] if r["tp"] == t]
            inv = [r["deterministic"] for r in results["invariance_model"] if r["tp"] == t]
            lines.append(f"| {t} | {eq[0] if eq else 'not run'} | {inv[0] if inv else 'not run'} |")
    if results["cost"]:
        lines += deterministic_bench.cost_table(results)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", default="2,4", help="tensor-parallel sizes for part 3")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-engines", dest="engines", action="store_false",
                        help="skip the core vs Megatron engine check (needs megatron-core)")
    parser.add_argument("--no-model", dest="model", action="store_false", help="skip part 3")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    log = tee_log(args.out)

    import triton

    from sp_core.kernels import lookup
    from sp_core import mpu

    kernel = lookup.batch_invariant_matmul(torch.device("cuda"))
    if kernel is None:
        log("FAIL: no batch-invariant kernel on this machine (CUDA + Triton, SP_CORE_FUSED not 0)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # cuBLAS's float32 contrast in full precision too
    results = header(triton=triton.__version__, iters=args.iters, layers=args.layers, invariance=[], speed=[],
                     equality=[], invariance_model=[], cost=[])
    start = time.time()
    log("1. batch invariance of the kernel (one GPU)")
    bf16 = [(n, k) for _, n, k in linears(4)[:2]] + [(512, 4096), (1536, 4000)]  # small-N tile; K tail
    for dtype, shapes in ((torch.bfloat16, bf16), (torch.float16, bf16[:1]), (torch.float32, bf16[:1])):
        for n, k in shapes:
            results["invariance"].append(invariance(kernel, n, k, dtype, log))
    log(f"2. speed (one GPU) [{time.time() - start:.0f} s]")
    with mpu.building(mpu.single_rank()):
        for t in (1, 2, 4):
            results["speed"] += speed(kernel, t, args.iters, log)
    tps = [t for t in (int(x) for x in args.tp.split(",")) if t <= torch.cuda.device_count()]
    if args.model and tps:
        from sp_core.app.tiny import make_checkpoint

        torch.cuda.empty_cache()  # GPU 0 is rank 0's too
        log(f"3. the mode on the model, t = {tps} [{time.time() - start:.0f} s]")
        model_dir = make_checkpoint("qwen3", os.path.join(tempfile.mkdtemp(prefix="sp-core-bi-"), "qwen3"))
        with open(os.path.join(model_dir, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        for t in tps:
            if args.engines:
                results["equality"] += deterministic_bench.engines_equal(model_dir, t, vocab, log, modes=(True,))
            results["invariance_model"].append(deterministic_bench.batch_invariance(model_dir, t, vocab, log))
        for t in tps:
            results["cost"] += deterministic_bench.cost(t, args.layers, [TOKENS], args.iters, log)
    log(f"done in {time.time() - start:.0f} s")
    md = markdown(results)
    save_results(args.out, results, md)
    log(md)
    failed = [f"kernel not batch-invariant: {r}" for r in results["invariance"] if r["kernel_differ"]]
    failed += [f"kernel error: {r}" for r in results["invariance"]
               if r["kernel_error"] > (1e-5 if r["dtype"] == "float32" else 2 * r["cublas_error"] + 1e-2)]
    failed += [f"engines differ: {r}" for r in results["equality"] if not r["equal"]]
    failed += [f"prefill not batch-invariant: {r}" for r in results["invariance_model"]
               if not (r["deterministic"] and r["deterministic_sp_on_vs_off"])]
    for line in failed:
        log(f"FAIL: {line}")
    log(f"{'FAIL' if failed else 'PASS'}: {len(failed)} checks failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
