"""Collective microbenchmark for issue 19's t = 4 question: is TP-SP's all-gather + reduce-scatter pair
slower than TP's one all-reduce of the same [T, H] tensor on this machine, and is the cost in NCCL or
in sp_core.mpu's wrappers?

    python -m benchmarks.collective_bench --tp 2,4 --tokens 2048,8192,32768 --label default --out $OUT
    NCCL_ALGO=Ring python -m benchmarks.collective_bench --tp 4 --label ring --out $OUT
    python -m benchmarks.collective_bench --compare $OUT/collectives_*.json     # one table, all settings
    python -m benchmarks.collective_bench --backend gloo --tp 2 --tokens 64 --hidden 32 --iters 3 --out /tmp/c

Per tp size t and T, on [T, H] bf16 (H = 4096, Qwen3-8B's hidden size), in one launch of t ranks
(sp_core.procs.launch, as benchmarks.bench), each op timed alone after a barrier (CUDA events, median of --iters
after --warmup):

    core_ag / core_rs     sp_core.mpu.collectives.all_gather(x[T/t]) / reduce_scatter_start(x[T]).wait():
                          the calls the column / row layers make under SP in the default mode
    core_pair             both, one after the other (what SP pays where TP pays one all-reduce)
    core_ar               collectives.all_reduce(x[T]) (f-bar, TP's call; it clones its input)
    raw_*                 the same through torch.distributed directly: sync ops into preallocated
                          outputs, all-reduce in place
    raw_async_pair        the raw pair with async_op=True + wait(), as sp_core issues them
    *_chain8              8 back-to-back calls (4 layers x 2 per layer) between two barriers, per call

An NCCL setting (NCCL_ALGO, NCCL_PROTO, ...) applies from a communicator's creation: give each its own
invocation, with --label. Every row holds each rank's median ms; "ms" is the median over iterations of
the slowest rank's time (what a layer waits for), "ms_last" of the fastest rank's (the rank that
arrived last: the collective itself, without waiting for peers). Launch skew: per iteration, the spread
of the host clock (CLOCK_MONOTONIC, one host) at which the ranks issued the op after the barrier.
Bus bandwidth as nccl-tests: all-gather / reduce-scatter S (t-1)/t, all-reduce 2 S (t-1)/t over
ms_last, S = T x H x 2 bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.common import header, save_results

CHAIN = 8
# torch >= 2.12 renamed the tensor collectives (as sp_core.mpu.collectives resolves them)
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _bus_factor(op: str) -> int:
    """Bus bytes of one call of ``op`` in units of S (t-1)/t: an all-gather or reduce-scatter 1, the
    pair or an all-reduce 2."""
    return 2 if "pair" in op or op.split("_")[1] == "ar" else 1


def _ops(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device):
    """{name: callable} for one size, on preallocated inputs."""
    from sp_core import mpu
    from sp_core.mpu import collectives

    p = mpu.default_context()
    t, group = p.size, p.group
    gen = torch.Generator(device="cpu").manual_seed(p.rank)
    full = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    shard = full[: tokens // t].clone()
    gathered = torch.empty_like(full)
    scattered = torch.empty_like(shard)
    reduced = full.clone()  # raw all-reduce works in place; its values only grow (inf does not slow NCCL)

    def core_ag():
        collectives.all_gather(p, shard)

    def core_rs():
        collectives.reduce_scatter_start(p, full).wait()

    def core_pair():
        core_ag()
        core_rs()

    def core_ar():
        collectives.all_reduce(p, full)

    def raw_ag():
        _all_gather_tensor(gathered, shard, group=group)

    def raw_rs():
        _reduce_scatter_tensor(scattered, full, group=group)

    def raw_pair():
        raw_ag()
        raw_rs()

    def raw_ar():
        dist.all_reduce(reduced, group=group)

    def raw_async_pair():
        _all_gather_tensor(gathered, shard, group=group, async_op=True).wait()
        _reduce_scatter_tensor(scattered, full, group=group, async_op=True).wait()

    def chain(fn):
        def run():
            for _ in range(CHAIN):
                fn()
        return run

    ops = dict(core_ag=core_ag, core_rs=core_rs, core_pair=core_pair, core_ar=core_ar, raw_ag=raw_ag,
               raw_rs=raw_rs, raw_pair=raw_pair, raw_ar=raw_ar, raw_async_pair=raw_async_pair)
    for name in ("core_pair", "core_ar", "raw_pair", "raw_ar"):
        ops[f"{name}_chain8"] = chain(ops[name])
    return ops


def _time_op(fn, iters: int, warmup: int):
    """(device ms per iteration, host clock at the barrier's return, host clock at the issue), lists."""
    from sp_core import mpu
    from sp_core.mpu import collectives, platform

    cuda = platform.device_type() == "cuda"
    for _ in range(warmup):
        fn()
    platform.synchronize()
    ms, released, issued = [], [], []
    for _ in range(iters):
        collectives.barrier(mpu.default_context())
        platform.synchronize()
        released.append(time.clock_gettime(time.CLOCK_MONOTONIC))
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            issued.append(time.clock_gettime(time.CLOCK_MONOTONIC))
            fn()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            issued.append(time.clock_gettime(time.CLOCK_MONOTONIC))
            fn()
            ms.append((time.perf_counter() - begin) * 1e3)
    platform.synchronize()
    return ms, released, issued


def _rank(tokens_list, hidden: int, dtype_name: str, iters: int, warmup: int):
    from sp_core import mpu
    from sp_core.mpu import platform

    dtype = getattr(torch, dtype_name)
    device = platform.current_device()
    t, group = mpu.default_context().size, mpu.default_context().group
    rows = []
    for tokens in tokens_list:
        for name, fn in _ops(tokens, hidden, dtype, device).items():
            ms, released, issued = _time_op(fn, iters, warmup)
            mine = torch.tensor([ms, released, issued], dtype=torch.float64, device=device)
            every = torch.empty((t * 3, iters), dtype=torch.float64, device=device)
            _all_gather_tensor(every, mine, group=group)
            ms_r, released_r, issued_r = (every.view(t, 3, iters)[:, i].cpu() for i in range(3))  # [t, iters]
            per_call = CHAIN if name.endswith("_chain8") else 1
            first_release = released_r.min(0).values
            rows.append(dict(
                tp=t, tokens=tokens, op=name, calls=per_call,
                rank_ms=[statistics.median(r) / per_call for r in ms_r.tolist()],
                ms=ms_r.max(0).values.median().item() / per_call,
                ms_last=ms_r.min(0).values.median().item() / per_call,
                skew_us=(issued_r.max(0).values - issued_r.min(0).values).median().item() * 1e6,
                skew_max_us=(issued_r.max(0).values - issued_r.min(0).values).max().item() * 1e6,
                rank_issue_after_first_release_us=[statistics.median(r) * 1e6 for r in
                                                   (issued_r - first_release).tolist()]))
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def _add_bandwidth(rows, hidden: int, itemsize: int):
    for r in rows:
        size = r["tokens"] * hidden * itemsize
        bus = _bus_factor(r["op"]) * size * (r["tp"] - 1) / r["tp"]
        r["busbw_gbs"] = bus / (r["ms_last"] * 1e-3) / 1e9 if r["ms_last"] > 0 else float("nan")
        r["busbw_slowest_gbs"] = bus / (r["ms"] * 1e-3) / 1e9 if r["ms"] > 0 else float("nan")


def nccl_env() -> dict:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("NCCL_", "TORCH_NCCL_", "CUDA_DEVICE_MAX_CONNECTIONS"))}


def table(result: dict) -> str:
    """Per (t, T): pair / all-reduce through the core and raw, chained, and the ops' details."""
    lines = [f"## {result['label']}: {result['device']}; torch {result['torch']}; NCCL {result['nccl']}; "
             f"env {result['env'] or '{}'}", "",
             "| t | T | op | ms (slowest rank) | ms (last to arrive) | bus GB/s | skew median / max us | rank ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['tp']} | {r['tokens']} | {r['op']} | {r['ms']:.3f} | {r['ms_last']:.3f} | "
                     f"{r['busbw_gbs']:.0f} | {r['skew_us']:.0f} / {r['skew_max_us']:.0f} | "
                     + " ".join(f"{x:.3f}" for x in r["rank_ms"]) + " |")
    lines += ["", "| t | T | core pair / core AR | raw pair / raw AR | core pair / raw pair | core AR / raw AR | "
              "chained: core pair / core AR | chained: raw pair / raw AR |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["tp"], r["tokens"], r["op"]): r["ms"] for r in result["rows"]}
    for t, tokens in sorted({(r["tp"], r["tokens"]) for r in result["rows"]}):
        g = lambda op: by.get((t, tokens, op), float("nan"))  # noqa: E731
        lines.append(f"| {t} | {tokens} | {g('core_pair') / g('core_ar'):.3f} | {g('raw_pair') / g('raw_ar'):.3f} | "
                     f"{g('core_pair') / g('raw_pair'):.3f} | {g('core_ar') / g('raw_ar'):.3f} | "
                     f"{g('core_pair_chain8') / g('core_ar_chain8'):.3f} | {g('raw_pair_chain8') / g('raw_ar_chain8'):.3f} |")
    return "\n".join(lines) + "\n"


def compare(paths, tp: int, tokens: int) -> str:
    """One table over settings at (tp, tokens), and the setting whose chained core pair is fastest."""
    results = [json.load(open(p)) for p in paths]
    lines = [f"## NCCL settings compared at t = {tp}, T = {tokens} (ms per call, slowest rank)", "",
             "| setting | env | core pair | core AR | pair / AR | chained core pair | chained core AR | chained pair / AR | raw pair | raw AR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    best = None
    for res in results:
        by = {r["op"]: r["ms"] for r in res["rows"] if r["tp"] == tp and r["tokens"] == tokens}
        if not by:
            continue
        env = " ".join(f"{k}={v}" for k, v in res["env"].items()
                       if k.startswith("NCCL_") and k != "NCCL_NVLS_ENABLE" and not k.startswith("NCCL_DEBUG"))
        lines.append(f"| {res['label']} | {env or '-'} | "
                     f"{by['core_pair']:.3f} | {by['core_ar']:.3f} | {by['core_pair'] / by['core_ar']:.3f} | "
                     f"{by['core_pair_chain8']:.3f} | {by['core_ar_chain8']:.3f} | "
                     f"{by['core_pair_chain8'] / by['core_ar_chain8']:.3f} | {by['raw_pair']:.3f} | {by['raw_ar']:.3f} |")
        if best is None or by["core_pair_chain8"] < best[1]:
            best = (res, by["core_pair_chain8"])
    if best is not None:
        lines += ["", f"fastest chained core pair: {best[0]['label']}"]
    return "\n".join(lines) + "\n", (best[0] if best else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", default="2,4")
    parser.add_argument("--tokens", default="2048,8192,32768")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--label", default="default", help="names this invocation's NCCL setting")
    parser.add_argument("--backend", choices=("auto", "gloo"), default="auto",
                        help="gloo: the CPU path (smoke test); auto: NCCL on GPUs")
    parser.add_argument("--out", default="out")
    parser.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                        help="print one table over the given results (no run)")
    parser.add_argument("--compare-at", default="4,8192", help="t,T for --compare")
    parser.add_argument("--print-env-of-best", action="store_true",
                        help="with --compare: print only the NCCL_ALGO / NCCL_PROTO assignments of the fastest "
                             "setting other than the default's (for a shell script)")
    args = parser.parse_args()
    if args.compare:
        tp, tokens = (int(x) for x in args.compare_at.split(","))
        text, best = compare(args.compare, tp, tokens)
        if args.print_env_of_best:
            env = best["env"] if best else {}
            print(" ".join(f"{k}={v}" for k, v in env.items() if k in ("NCCL_ALGO", "NCCL_PROTO")))
        else:
            print(text)
        return
    if args.backend == "gloo":
        os.environ["SP_CORE_DEVICE"] = "cpu"
    from sp_core.mpu import platform
    from sp_core.procs.launch import run_ranks

    tokens_list = [int(x) for x in args.tokens.split(",")]
    cuda = platform.device_type() == "cuda"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-"
    result = dict(label=args.label, **header(nccl=nccl, backend=platform.backend(), env=nccl_env(),
                                             hidden=args.hidden, dtype=args.dtype, rows=[]))
    if not cuda:
        result["device"] = f"{result['device']} (gloo)"
    for t in (int(x) for x in args.tp.split(",")):
        if t > platform.device_count() and cuda:
            print(f"skip t={t}: {platform.device_count()} devices", flush=True)
            continue
        bad = [n for n in tokens_list if n % t]
        if bad:
            raise SystemExit(f"collective_bench: --tokens {bad} not divisible by t = {t}")
        started = time.time()
        result["rows"] += run_ranks(t, _rank, tokens_list, args.hidden, args.dtype, args.iters, args.warmup,
                                    timeout=300)[0]
        print(f"t={t}: {time.time() - started:.0f} s", flush=True)
    _add_bandwidth(result["rows"], args.hidden, getattr(torch, args.dtype).itemsize)
    text = table(result)
    save_results(args.out, result, text, name=f"collectives_{args.label}")
    print(text)
    print(f"wrote {os.path.join(args.out, f'collectives_{args.label}.json')}")


if __name__ == "__main__":
    main()
