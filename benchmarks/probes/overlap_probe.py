"""Why does a collective in flight not hide behind the GEMM beside it? A probe for issue 19 (CUDA only).

What it showed (2 x H200, docs/async_tp.md "Round 5"): an NCCL collective beside a GEMM shares the SMs, so
"split" hid almost nothing (t = 2, 8K rows, qkv_proj: off 0.457 ms, split 0.425); fewer NCCL CTAs or a
high-priority stream did not help; copy engines (no SMs) did, and became the "copy_engine" form.

For each Qwen3-8B-shaped linear under SP, at M all-token rows, forward, median ms on rank 0:

    gemm            the layer's GEMM alone (all rows); gemm_local: this rank's rows only
    comm[:g]        the all-gather / reduce-scatter alone, on group g
    off             the collective, then the GEMM (or the GEMM, then the collective): today's default
    split:g         the collective in flight on group g beside part of the GEMM (sp_core's "split" form)
    ce              copy engines instead of SM kernels: sp_core's "copy_engine" form (round 5's probe call
                    ran a first copy of it that lived in this file)

Groups g: "default" (the TP group), "hp" (a high-priority NCCL stream), "cta4" / "cta8" / "cta16" (NCCL's
max_ctas: the collective's kernel takes at most that many SMs from the GEMM).

    python -m benchmarks.probes.overlap_probe --rows 8192,16384 --out $OUT    # t = every GPU of the machine
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from benchmarks.async_tp_bench import layers
from benchmarks.common import context, timed

GROUPS = {"hp": dict(high_priority=True), "cta4": dict(max_ctas=4), "cta8": dict(max_ctas=8),
          "cta16": dict(max_ctas=16)}


def _groups(t: int) -> dict:
    made = {"default": None}
    for name, spec in GROUPS.items():
        opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=spec.get("high_priority", False))
        if "max_ctas" in spec:
            opts.config.max_ctas = spec["max_ctas"]
        made[name] = dist.new_group(list(range(t)), pg_options=opts)
    return made


def _rank(rows_list, iters):
    from sp_core import mpu
    from sp_core.mpu import collectives

    ce = context({"SP_CORE_ASYNC_TP": "copy_engine"})  # what collectives' fused ops run (the "ce" cases)
    t, r = ce.size, ce.rank
    groups = _groups(t)
    found = []

    def ag(x, group):
        out = x.new_empty((x.shape[0] * t, x.shape[1]))
        return dist.all_gather_into_tensor(out, x, group=group, async_op=True), out

    def rs_start(x, group):
        out = x.new_empty((x.shape[0] // t, x.shape[1]))
        return dist.reduce_scatter_tensor(out, x, group=group, async_op=True), out

    for op, name, k, n in layers(t):
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t()
        for rows in rows_list:
            cases = {}
            if op == "all_gather_matmul":
                x = torch.randn(rows // t, k, device="cuda", dtype=torch.bfloat16)
                full = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                cases["gemm"] = lambda: full @ b
                cases["gemm_local"] = lambda: x @ b

                def off(g=None):
                    work, out = ag(x, g)
                    work.wait()
                    return out @ b

                def split(g):
                    work, gathered = ag(x, g)
                    out = x.new_empty((rows, b.shape[1]))
                    m = rows // t
                    torch.matmul(x, b, out=out[r * m:(r + 1) * m])
                    work.wait()
                    for lo, hi in ((0, r * m), ((r + 1) * m, rows)):
                        if hi > lo:
                            torch.matmul(gathered[lo:hi], b, out=out[lo:hi])
                    return out

                for g in groups:
                    cases[f"comm:{g}"] = lambda g=g: ag(x, groups[g])[0].wait()
                    cases[f"split:{g}"] = lambda g=g: split(groups[g])
                cases["off"] = off
                cases["ce"] = lambda: collectives.all_gather_matmul(ce, x, b)
            else:
                a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                cases["gemm"] = lambda: a @ b
                y = a @ b

                def off_rs(g=None):
                    work, out = rs_start(a @ b, g)
                    work.wait()
                    return out

                def split_rs(g):
                    half = b.shape[1] // 2
                    w0, o0 = rs_start(a @ b[:, :half], g)
                    w1, o1 = rs_start(a @ b[:, half:], g)
                    w0.wait()
                    w1.wait()
                    return torch.cat([o0, o1], -1)

                for g in groups:
                    cases[f"comm:{g}"] = lambda g=g: rs_start(y, groups[g])[0].wait()
                    cases[f"split:{g}"] = lambda g=g: split_rs(groups[g])
                cases["off"] = off_rs
                cases["ce"] = lambda: collectives.matmul_reduce_scatter(ce, a, b)
            for case, fn in cases.items():
                try:
                    ms, _ = timed(fn, iters, warmup=5)
                except Exception as err:  # noqa: BLE001  (a probe: record what failed, go on)
                    ms = float("nan")
                    found.append(dict(tp=t, layer=name, rows=rows, case=case, error=repr(err)[:300]))
                    continue
                found.append(dict(tp=t, op=op, layer=name, rows=rows, case=case, ms=ms))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=None)
    parser.add_argument("--rows", default="8192,16384")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    from sp_core.procs.launch import run_ranks

    t = args.tp or torch.cuda.device_count()
    os.makedirs(args.out, exist_ok=True)
    found = run_ranks(t, _rank, [int(x) for x in args.rows.split(",")], args.iters, timeout=400)[0]
    with open(os.path.join(args.out, "overlap_probe.json"), "w") as f:
        json.dump(dict(device=f"{t} x {torch.cuda.get_device_name(0)}", measured=found), f, indent=1)
    for row in found:
        print(row, flush=True)


if __name__ == "__main__":
    main()
