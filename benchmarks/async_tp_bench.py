"""Measure where fusing a collective with its GEMM (async TP) pays, and write the decision table that
sp_core.mpu.async_tp reads (docs/async_tp.md holds the committed one).

    python -m benchmarks.async_tp_bench --tp 2,4 --out $OUT      # -> $OUT/async_tp.json, async_tp_table.json

For each tp size, op and Qwen3-8B-shaped linear layer, and all-token row counts M, times the unfused
form ("off": all_gather then GEMM / GEMM then reduce_scatter) against each fused one ("ring", "split",
"copy_engine", "symm_mem"), forward, median of --iters (device events). At each M an op gets the fused
form whose time summed over the op's layers beats "off" by at least 2% (the fastest such), else "off";
--decide-from re-decides from several calls' measurements, averaged.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.common import SHAPE, context, header, timed

ROWS = (1024, 2048, 4096, 8192, 16384, 32768)
MARGIN = 0.98


def layers(t: int):
    """(op, name, K, N) per rank: y[M, N] = all_gather(x)[M, K] @ b or reduce_scatter(x[M, K] @ b)."""
    h, q, kv, d, f = (SHAPE["hidden_size"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"],
                      SHAPE["head_dim"], SHAPE["intermediate_size"])
    return [("all_gather_matmul", "qkv_proj", h, (q + 2 * kv) * d // t),
            ("all_gather_matmul", "gate_up_proj", h, 2 * f // t),
            ("matmul_reduce_scatter", "o_proj", q * d // t, h),
            ("matmul_reduce_scatter", "down_proj", f // t, h)]


def _rank(impls, rows_list, iters):
    from sp_core import mpu
    from sp_core.mpu import collectives

    t = mpu.default_context().size
    forms = {impl: context({"SP_CORE_ASYNC_TP": impl}) for impl in impls}  # one context per form
    out = []
    for op, name, k, n in layers(t):
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t()  # a weight's transpose, as layers pass it
        for rows in rows_list:
            local = rows // t if op == "all_gather_matmul" else rows
            x = torch.randn(local, k, device="cuda", dtype=torch.bfloat16)
            op_fn = collectives.all_gather_matmul if op == "all_gather_matmul" else collectives.matmul_reduce_scatter
            for impl in impls:
                ms, _ = timed(lambda: op_fn(forms[impl], x, b), iters)
                out.append(dict(tp=t, op=op, layer=name, rows=rows, impl=impl, ms=ms))
            del x
    context({"SP_CORE_ASYNC_TP": "auto"})
    return out


def decide(rows_measured, t: int):
    """{op: [[M, impl], ...]} for one tp size: at each measured M, the fused form whose time summed over the
    op's layers (what a decoder layer spends in that op) beats "off" by 2%, the fastest such; else "off".
    Repeated measurements of one (form, layer, M) -- several calls' files -- are averaged first."""
    entries = {}
    for op in ("all_gather_matmul", "matmul_reduce_scatter"):
        mine = [r for r in rows_measured if r["tp"] == t and r["op"] == op]
        samples = {}
        for r in mine:
            samples.setdefault((r["impl"], r["layer"], r["rows"]), []).append(r["ms"])
        timed = {key: sum(ms) / len(ms) for key, ms in samples.items()}
        steps = []
        for rows in sorted({r["rows"] for r in mine}):
            layer_names = sorted({r["layer"] for r in mine if r["rows"] == rows})
            if not all(("off", name, rows) in timed for name in layer_names):
                continue  # a layer without its unfused time (merged files of other sizes): no decision here
            off_ms = sum(timed[("off", name, rows)] for name in layer_names)
            best, best_ms = "off", MARGIN * off_ms
            for impl in sorted({r["impl"] for r in mine} - {"off"}):
                keys = [(impl, name, rows) for name in layer_names]
                total = sum(timed[k] for k in keys) if all(k in timed for k in keys) else None
                if total is not None and total < best_ms:
                    best, best_ms = impl, total
            steps.append([rows, best])
        if any(impl != "off" for _, impl in steps):
            entries[op] = steps
    return entries


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", default="2,4")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="out")
    parser.add_argument("--decide-from", default="", help="comma-separated async_tp.json files of earlier calls: "
                        "write the table from their averaged measurements, measure nothing")
    args = parser.parse_args()
    if args.decide_from:
        measured = []
        for path in args.decide_from.split(","):
            with open(path) as f:
                measured += json.load(f)["measured"]
        table = {f"nccl:{t}": decide(measured, t) for t in sorted({r["tp"] for r in measured})}
        print(json.dumps({k: v for k, v in table.items() if v}))
        return
    from sp_core.mpu import platform
    from sp_core.procs.launch import RankFailed, run_ranks

    os.makedirs(args.out, exist_ok=True)
    rows_list = [int(x) for x in args.rows.split(",")]
    measured, errors, table = [], {}, {}
    for t in (int(x) for x in args.tp.split(",")):
        measured += run_ranks(t, _rank, ("off", "ring", "split"), rows_list, args.iters, timeout=300)[0]
        if platform.symmetric_memory_ops_available():
            try:  # separately: a failure here must not lose the other measurements
                measured += run_ranks(t, _rank, ("copy_engine", "symm_mem"), rows_list, args.iters, timeout=180)[0]
            except RankFailed as err:
                errors[f"tp{t} symmetric memory"] = f"{err.error_type}: {err.error_message}"[:2000]
        decided = decide(measured, t)
        if decided:
            table[f"{platform.backend()}:{t}"] = decided
        for r in measured:
            if r["tp"] == t:
                print(f"t={t} {r['op']:22s} {r['layer']:12s} M={r['rows']:6d} {r['impl']:8s} {r['ms']:8.3f} ms", flush=True)
    result = header(measured=measured, errors=errors, table=table)
    with open(os.path.join(args.out, "async_tp.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "async_tp_table.json"), "w") as f:
        json.dump(table, f, indent=1)
    print("errors:", json.dumps(errors, indent=1))
    print("decision table:", json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
