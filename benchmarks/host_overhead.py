"""Host-side cost of one decoder layer (Qwen3; DeepSeek-V3's MoE layer): what Python and the dispatcher do
per call, apart from the kernels. A launch-bound step (the GPU waiting on the host, docs/benchmarks.md
"Round 3") gets faster only by issuing fewer ops, or cheaper ones; this counts them.

Per variant, on rank 0: ATen ops dispatched (a TorchDispatchMode counter; forward and backward apart),
autograd nodes the forward records, collectives issued (c10d ops seen by the same counter, so Megatron's
own collectives count too), and host microseconds per layer call (median of --reps):

    core_tp_prefill / core_sp_prefill   the core's layer, no grad, SP off / on (serving's prefill)
    core_tp_train / core_sp_train       the core's layer, forward + backward, SP off / on
    deepseek_*                          the same four for the core's DeepSeek-V3 MoE layer (MLA + MoE with
                                        TP-sharded experts; common.DEEPSEEK_V3, or its tiny one)
    megatron_core                       the core's layer through the Megatron adapter's spec (SPCoreTransformerLayer)
    megatron_native_sdpa                Megatron-native's TransformerLayer (local spec) with torch SDPA attention
    megatron_native                     Megatron-native's TransformerLayer with its unfused DotProductAttention
                                        (on CPU given the causal mask, which on GPU it builds each call)

The megatron_* variants run forward + backward with Megatron's ``sequence_parallel`` (t > 1) on [s/t, 1, h];
Megatron's rotary table is computed once per model, outside the layer, as GPTModel does.

Host time: on CUDA, the wall time to enqueue one call with the device idle at its start (the call's host
cost as long as it does not wait on the device: the host syncs inside one call are counted too), and the
device time per call (events) as wall time; on CPU, the calling thread's CPU time per call (waits on peer
ranks in gloo excluded), with tiny shapes so that compute is negligible, and the wall time.

    python -m benchmarks.host_overhead --tp 1,2 --variants all --out out/host   # CPU, gloo, tiny shapes
    python -m benchmarks.host_overhead --tp 4 --out $OUT         # 4 GPUs, Qwen3-8B-shaped, 2K tokens (+ --variants all)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks import megatron_bench
from benchmarks.common import (QWEN3_TINY, SHAPE, deepseek_v3_config, header, host_side, random_deepseek_stack,
                               random_qwen3_stack, save_results, timed)
from tests.support.op_counts import count_ops

SHAPES = {"qwen3-8b": SHAPE, "tiny": QWEN3_TINY}  # DeepSeek: V3's shape, or common.DEEPSEEK_TINY over it
CORE_VARIANTS = ("core_tp_prefill", "core_sp_prefill", "core_tp_train", "core_sp_train")
DEEPSEEK_VARIANTS = ("deepseek_tp_prefill", "deepseek_sp_prefill", "deepseek_tp_train", "deepseek_sp_train")
MEGATRON_VARIANTS = ("megatron_core", "megatron_native_sdpa", "megatron_native")
ALL_VARIANTS = CORE_VARIANTS + DEEPSEEK_VARIANTS + MEGATRON_VARIANTS


def _cpu_seconds(fn) -> tuple[float, float]:
    """(the calling thread's CPU seconds, wall seconds) of one ``fn()``."""
    begin, begin_cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.thread_time() - begin_cpu, time.perf_counter() - begin


@dataclass(frozen=True)
class Setting:
    """What every rank measures: shape (a key of SHAPES), tokens per call, dtype, repetitions, the variants, and
    whether to keep a cProfile of rank 0's calls (the Python functions where the host time goes)."""

    shape_name: str
    tokens: int
    dtype: torch.dtype
    reps: int
    variants: tuple
    cprofile: bool = False


def _cprofile_text(call, calls: int = 20, top: int = 40) -> str:
    """cProfile of ``calls`` calls of ``call``, the ``top`` functions by own time; then torch.profiler's ops by
    self CPU time, which also sees the autograd threads (on CUDA the backward runs in one; cProfile misses it)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    profiler = cProfile.Profile()
    profiler.runcall(lambda: [call() for _ in range(calls)])
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    with profile(activities=[ProfilerActivity.CPU]) as ops:
        for _ in range(calls):
            call()
    text.write(f"\ntorch.profiler, {calls} calls, CPU ops by self time:\n")
    text.write(ops.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return text.getvalue()


def measure(forward, grad, setting: Setting, warmup: int = 5) -> dict:
    """Counts and host time of ``forward()`` (then ``out.backward(grad)`` when ``grad`` is not None)."""
    from sp_core import mpu
    from sp_core.mpu import collectives, platform

    def call():
        out = forward()
        if grad is not None:
            out.backward(grad)

    for _ in range(warmup):
        call()
    result = count_ops(forward, grad)
    if setting.cprofile:
        result["cprofile"] = _cprofile_text(call)
    collectives.barrier(mpu.default_context())
    reps = setting.reps
    if platform.device_type() == "cuda":  # enqueue time and host syncs (common.host_side), device wall time
        host = host_side(call, reps)
        wall_ms, _ = timed(call, reps, warmup=0)
        result.update(host_us=round(host["enqueue_ms"] * 1e3, 1), wall_us=round(wall_ms * 1e3, 1),
                      host_syncs=host["host_syncs"], first_sync=host["first_sync"])
        return result
    host, wall = zip(*(_cpu_seconds(call) for _ in range(reps)))
    result.update(host_us=round(statistics.median(host) * 1e6, 1), wall_us=round(statistics.median(wall) * 1e6, 1),
                  host_syncs="n/a")  # torch's sync debug mode is CUDA's
    return result


def _report(name: str, result: dict) -> dict:
    """``result``, announced by rank 0 as it comes (a long GPU call shows how far it got)."""
    from sp_core import mpu
    from sp_core.procs import launch

    if mpu.default_context().rank == 0:
        launch.progress(f"t={mpu.default_context().size} {name}: {result['aten_fwd']} + {result['aten_bwd']} ATen ops, "
                        f"{result['collectives_fwd']} + {result['collectives_bwd']} collectives, "
                        f"host {result['host_us']:.0f} us, wall {result['wall_us']:.0f} us")
    return result


def _layer_variants(prefix: str, layer, hidden_size: int, setting: Setting) -> dict:
    """``{prefix}_{tp|sp}_{prefill|train}`` among ``variants``: ``layer(x, positions, batch, tokens)`` on this
    rank's rows of one packed sequence, SP off / on, no grad / forward + backward."""
    from sp_core import mpu
    from sp_core.layers import PackedBatch
    from sp_core.mpu import platform

    device, t, tokens = platform.current_device(), mpu.default_context().size, setting.tokens
    positions, batch = torch.arange(tokens, device=device), PackedBatch([tokens])
    out = {}
    for name in (f"{prefix}_{mode}_{phase}" for phase in ("prefill", "train") for mode in ("tp", "sp")):
        if name not in setting.variants:
            continue
        sp, train = "_sp_" in name, name.endswith("_train")
        with mpu.default_context().sequence_parallel_for(sp):
            x = torch.randn(tokens // t if sp and t > 1 else tokens, hidden_size, device=device, dtype=setting.dtype,
                            requires_grad=train)
            with torch.set_grad_enabled(train):
                out[name] = _report(name, measure(lambda: layer(x, positions, batch, tokens),
                                                  torch.randn_like(x) if train else None, setting))
            layer.zero_grad(set_to_none=True)
    return out


def _core_variants(setting: Setting) -> dict:
    """The core's Qwen3 layer and, where asked, DeepSeek-V3's MoE layer (MLA + MoE, TP-sharded experts)."""
    from sp_core.mpu import platform

    shape = SHAPES[setting.shape_name]
    _, (layer,) = random_qwen3_stack(1, shape, setting.dtype)
    out = _layer_variants("core", layer, shape["hidden_size"], setting)
    if any(v.startswith("deepseek_") for v in setting.variants):
        cfg = deepseek_v3_config(2, setting.shape_name == "tiny", "tp")  # layer 0 dense, layer 1 MoE (first_k_dense_replace = 1)
        moe_layer = random_deepseek_stack(cfg, setting.dtype, platform.current_device(), bias_std=0.01)[1]
        out.update(_layer_variants("deepseek", moe_layer, cfg.hidden_size, setting))
    return out


@contextlib.contextmanager
def _cpu_shim_mode_off():
    """Without the CPU shims' TorchFunctionMode (it intercepts every torch call and would add its own cost to
    both sides' host time); megatron_native is given its causal mask so that it needs none of it."""
    from sp_core_megatron.cli_engine import cpu_training

    mode = cpu_training._MODE
    if mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def _megatron_variants(setting: Setting) -> dict:
    from sp_core.mpu import platform

    tp = megatron_bench.setup_megatron_rank()
    device, cpu = platform.current_device(), platform.device_type() == "cpu"
    shape, tokens = SHAPES[setting.shape_name], setting.tokens
    rows = tokens // tp if tp > 1 else tokens
    out = {}
    for name in MEGATRON_VARIANTS:
        if name not in setting.variants:
            continue
        variant = name[len("megatron_"):]
        model = megatron_bench.build_model(variant, 1, tp, tokens, shape, setting.dtype)
        layer = model.decoder.layers[0]
        x = torch.randn(rows, 1, shape["hidden_size"], device=device, dtype=setting.dtype, requires_grad=True)
        kwargs = {}
        if variant != "core":
            kwargs["rotary_pos_emb"] = model.rotary_pos_emb(tokens)
            if cpu and variant == "native":
                kwargs["attention_mask"] = torch.ones(tokens, tokens, dtype=torch.bool, device=device).triu(1)
        with _cpu_shim_mode_off() if cpu else contextlib.nullcontext():
            out[name] = _report(name, measure(lambda: layer(x, **kwargs)[0], torch.randn_like(x), setting))
        model = layer = None
    return out


def _rank(setting: Setting) -> dict:
    from sp_core import mpu
    from sp_core.mpu import platform

    if platform.device_type() == "cpu":
        torch.set_num_threads(1)  # no intra-op threads spinning in this thread's CPU time on a shared machine
    results = {"tp": mpu.default_context().size}
    results.update(_core_variants(setting))
    if any(v in setting.variants for v in MEGATRON_VARIANTS):
        results.update(_megatron_variants(setting))
    return results


def run(tp: int, setting: Setting) -> dict:
    from sp_core.procs.launch import run_ranks

    return run_ranks(tp, _rank, setting, timeout=900)[0]


def markdown(results: dict) -> str:
    lines = [f"Device: {results['device']}; torch {results['torch']}; {results['date']}; "
             f"shape {results['shape_name']}, {results['tokens']} tokens, {results['dtype']}; "
             f"host time = {results['host_time']}; command: `{results['command']}`", "",
             "| t | variant | ATen ops fwd | ATen ops bwd | autograd nodes | collectives fwd + bwd | host µs | "
             "wall µs | host syncs |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for name in ALL_VARIANTS:
            r = row.get(name)
            if r is None:
                continue
            lines.append(f"| {row['tp']} | {name} | {r['aten_fwd']} | {r['aten_bwd']} | {r['autograd_nodes']} | "
                         f"{r['collectives_fwd']} + {r['collectives_bwd']} | {r['host_us']:.0f} | {r['wall_us']:.0f} | "
                         f"{r['host_syncs']} |")
    ratios = [(row["tp"], native, row["megatron_core"]["host_us"] / row[native]["host_us"])
              for row in results["rows"] for native in ("megatron_native_sdpa", "megatron_native")
              if "megatron_core" in row and native in row]
    if ratios:
        lines += ["", "Host time inside Megatron, the core's layer over Megatron-native's (forward + backward):", "",
                  "| t | against | core / native host time |", "|---|---|---|"]
        lines += [f"| {t} | {native} | {ratio:.3f} |" for t, native, ratio in ratios]
    return "\n".join(lines) + "\n"


def main():
    from sp_core.mpu import platform

    cuda = platform.device_type() == "cuda"
    parser = argparse.ArgumentParser(description="Host-side cost (ops, collectives, µs) of one decoder layer")
    parser.add_argument("--tp", default="4" if cuda else "1,2")
    parser.add_argument("--shape", choices=("qwen3-8b", "tiny"), default="qwen3-8b" if cuda else "tiny")
    parser.add_argument("--tokens", type=int, default=2048 if cuda else 16)
    parser.add_argument("--reps", type=int, default=30 if cuda else 200)
    parser.add_argument("--variants", default=",".join(CORE_VARIANTS + MEGATRON_VARIANTS),
                        help="comma-separated, or 'all' (adds the DeepSeek-V3 MoE layer: on GPU a V3-sized layer, "
                        "~10 s more to build and time)")
    parser.add_argument("--out", default="out/host_overhead")
    parser.add_argument("--cprofile", action="store_true",
                        help="also write rank 0's cProfile and torch.profiler CPU-op table of 20 calls per variant "
                        "to OUT/cprofile/")
    args = parser.parse_args()
    variants = list(ALL_VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose among {list(ALL_VARIANTS)}")
    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if cuda else torch.float32  # gloo sums bf16 through float32: an extra cast on CPU
    os.makedirs(args.out, exist_ok=True)
    results = header(shape_name=args.shape, shape=shape, tokens=args.tokens, dtype=str(dtype).split(".")[-1],
                     host_time="enqueue time (device idle at start); wall = device time (events)" if cuda
                     else "calling thread's CPU time", rows=[])
    for t in (int(x) for x in args.tp.split(",")):
        row = run(t, Setting(args.shape, args.tokens, dtype, args.reps, tuple(variants), args.cprofile))
        for name in ALL_VARIANTS:  # cProfile texts go to files, not into the JSON
            if "cprofile" in row.get(name, {}):
                os.makedirs(os.path.join(args.out, "cprofile"), exist_ok=True)
                with open(os.path.join(args.out, "cprofile", f"t{t}_{name}.txt"), "w") as f:
                    f.write(row[name].pop("cprofile"))
        results["rows"].append(row)
        save_results(args.out, results, markdown(results))  # after each t: a call cut short keeps what ran
    print(markdown(results))


if __name__ == "__main__":
    main()
