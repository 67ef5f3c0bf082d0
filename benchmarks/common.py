"""What the benchmarks share: model shapes and random-weight layer stacks, timing (median ms and peak
memory of one call; the machine's matmul and all-reduce ceilings), profiling (kernel time by category,
host enqueue time) and result writing (the run's header, JSON + Markdown, the log, the ratio plot).

Every benchmark runs from the repository root as a module, ``python -m benchmarks.NAME --help``; the GPU
suites that chain them are ``scripts/gpu_bench.sh SUITE`` (``scripts/gpu_bench.sh list``). A benchmark
imports this module and, where it reuses another benchmark's measurement, that module's public
functions; never its ``_private`` names (tests/test_layout.py).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

# -- shapes ------------------------------------------------------------------------------------------

# Qwen3-8B's layer (hidden 4096, 32 heads, 8 KV heads, head_dim 128, FFN 12288): bench.py and most others
SHAPE = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             intermediate_size=12288, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6)
# a Qwen3 layer small enough that compute is negligible on CPU (host_overhead.py's CPU runs)
QWEN3_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                  vocab_size=128, rms_norm_eps=1e-6, rope_theta=1e6)
# DeepSeek-V3 (deepseek_bench.py, host_overhead.py's DeepSeek variants), and what --tiny puts over it
DEEPSEEK_V3 = dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                   kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256,
                   num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=2048, n_shared_experts=1,
                   intermediate_size=18432, first_k_dense_replace=1, topk_method="noaux_tc", scoring_func="sigmoid",
                   norm_topk_prob=True, routed_scaling_factor=2.5, vocab_size=129280, rms_norm_eps=1e-6,
                   rope_theta=10000.0, max_position_embeddings=163840,
                   rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                     beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
DEEPSEEK_TINY = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=64, kv_lora_rank=32,
                     qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16,
                     moe_intermediate_size=64, intermediate_size=512)


def qwen3_config(layers: int, shape: dict = SHAPE):
    from sp_core.models import ModelConfig

    return ModelConfig.from_dict(dict(shape, architectures=["Qwen3ForCausalLM"], num_hidden_layers=layers,
                                      max_position_embeddings=40960))


def context(env=None, **changes):
    """This rank's context (the launch's) with ``changes`` (sequence_parallel, deterministic), after the
    SP_CORE_* settings in ``env`` are set and read again (a variant of a benchmark: fused kernels, async TP)."""
    from sp_core import mpu, settings

    if env:
        os.environ.update(env)
        settings.reread()
    base = mpu.default_context()
    return base.replace(settings=settings.current(), **changes)


def random_qwen3_stack(layers: int, shape: dict = SHAPE, dtype: torch.dtype = torch.bfloat16, parallel=None):
    """(config, ``layers`` Qwen3 decoder layers of ``shape`` (Qwen3-8B's by default) with random weights of
    ``dtype`` on this rank's device), built on ``parallel`` (default: this rank's context)."""
    from sp_core import mpu
    from sp_core.models.qwen import qwen_decoder_layer
    from sp_core.mpu import platform

    torch.manual_seed(0)
    cfg = qwen3_config(layers, shape)
    with torch.device(platform.current_device()), mpu.building(mpu.context_for(parallel)):
        stack = torch.nn.ModuleList(qwen_decoder_layer(cfg, dtype=dtype) for _ in range(layers))
    for p in stack.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return cfg, stack


def deepseek_v3_shape(tiny: bool = False) -> dict:
    return dict(DEEPSEEK_V3, **(DEEPSEEK_TINY if tiny else {}))


def deepseek_v3_config(layers: int, tiny: bool, moe_parallel: str):
    """DeepSeek-V3's config (``DEEPSEEK_TINY`` over it where ``tiny``) with ``layers`` layers, the first dense;
    ``moe_parallel``: "tp" (TP-sharded experts) or "ep" (expert parallelism)."""
    from sp_core.models import ModelConfig

    return ModelConfig.from_dict(dict(deepseek_v3_shape(tiny), architectures=["DeepseekV3ForCausalLM"],
                                      model_type="deepseek_v3", num_hidden_layers=layers), moe_parallel)


def random_deepseek_stack(cfg, dtype, device, bias_std: float):
    """The decoder layers of ``cfg`` with their initial weights (seed 0) and, in each MoE layer, a random
    routing bias N(0, ``bias_std``) that skews the experts' load the way trained biases do."""
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


# -- timing ------------------------------------------------------------------------------------------


def timed(fn, iters: int, warmup: int = 3):
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` (device events on CUDA, the
    host clock around a synchronize elsewhere), and the peak bytes allocated above the starting point
    during one more call (0 off CUDA)."""
    from sp_core import mpu
    from sp_core.mpu import collectives, platform

    for _ in range(warmup):
        fn()
    platform.synchronize()
    collectives.barrier(mpu.default_context())
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    platform.synchronize()
    collectives.barrier(mpu.default_context())
    before = torch.cuda.memory_allocated() if cuda else 0
    platform.reset_peak_memory()
    fn()
    platform.synchronize()
    peak = platform.max_memory_allocated() - before if cuda else 0
    return statistics.median(times), peak


def ceilings():
    """Measured bf16 matmul rate (TFLOP/s) and all-reduce bus bandwidth (GB/s) over the TP group (CUDA)."""
    from sp_core import mpu
    from sp_core.mpu import collectives

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms, _ = timed(lambda: a @ a, 10)
    tflops = 2 * 8192 ** 3 / ms / 1e9
    p = mpu.default_context()
    t = p.size
    buf = torch.randn(128 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)  # 256 MiB
    ms, _ = timed(lambda: collectives.all_reduce(p, buf), 10)
    busbw = buf.numel() * 2 * 2 * (t - 1) / t / ms / 1e6
    return tflops, busbw


# -- profiling ---------------------------------------------------------------------------------------

# kernel name fragments (lower case) -> category; a kernel matching none is "other"
CATEGORIES = (("collective", ("nccl", "memcpy", "cross_device", "symm_mem", "barrier")),
              ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "splitk")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
              ("norm+rotary", ("rms", "norm", "rope")))
CATEGORY_NAMES = [c for c, _ in CATEGORIES] + ["other"]


def kernel_categories(fn, iters: int = 3, categories=CATEGORIES) -> dict:
    """Device time per kernel category (ms per call) over ``iters`` profiled calls; sums may exceed the
    wall time where kernels overlap (collectives beside GEMMs)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals = {name: 0.0 for name, _ in categories}
    totals["other"] = 0.0
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.key.lower()
        category = next((c for c, keys in categories if any(k in name for k in keys)), "other")
        totals[category] += evt.self_device_time_total / 1e3 / iters
    return {k: round(v, 3) for k, v in totals.items()}


def host_side(fn, iters: int = 5) -> dict:
    """Host milliseconds to enqueue one call (median, device idle at the start) and the number of host
    syncs inside it (torch's sync debug mode). A call whose enqueue time reaches its device time is
    launch-bound: the GPU waits on Python, and more, smaller ops cost wall time that no kernel shows."""
    import warnings

    enqueue = []
    for _ in range(iters):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        enqueue.append((time.perf_counter() - begin) * 1e3)
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [str(w.message).splitlines()[0][:80] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"enqueue_ms": round(statistics.median(enqueue), 3), "host_syncs": len(syncs),
            "first_sync": syncs[0] if syncs else ""}


# -- results -----------------------------------------------------------------------------------------

def device_name() -> str:
    """"N x <GPU name>" on CUDA, else the device type sp_core runs on ("cpu", "npu")."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    from sp_core.mpu import platform

    return platform.device_type()


def command() -> str:
    """The command line that runs this benchmark again: ``python -m benchmarks.NAME ARGS``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name else [sys.argv[0]]
    return " ".join(["python"] + program + sys.argv[1:])


def header(**extra) -> dict:
    """The start of every results.json: the card, torch, the date and the command, then ``extra``."""
    return dict(device=device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"), command=command(),
                **extra)


def plot_ratios(results: dict, path: str, curves, title_prefix: str = "", figsize=(10, 4), legend_fontsize=7,
                guides=(1.0,)) -> bool:
    """Write a PNG to ``path``: one panel per phase (``results["prefill"]``, ``results["train"]``) of TP-SP
    time / TP time against tokens (log 2), ``curves(ax, t, rows)`` drawing the rows of each t (sorted by
    tokens), grey lines at ``guides`` (the first solid, the rest dotted). False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    for ax, kind in zip(axes, ("prefill", "train")):
        for t in sorted({r["tp"] for r in results.get(kind, [])}):
            curves(ax, t, sorted((r for r in results[kind] if r["tp"] == t), key=lambda r: r["tokens"]))
        drawn = bool(ax.get_lines())  # no log axis on a panel with nothing drawn (every variant skipped)
        for i, y in enumerate(guides):
            ax.axhline(y, color="grey", lw=0.8, ls="-" if i == 0 else ":")
        if drawn:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("TP-SP time / TP time")
        ax.legend(fontsize=legend_fontsize)
        ax.set_title(f"{title_prefix}{kind}")
    fig.suptitle(results["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def tee_log(out_dir: str):
    """A ``log(line)`` that prints each line and appends it to ``out_dir``/log.txt (flushed at once, so a
    device call cut short still returns what ran)."""
    os.makedirs(out_dir, exist_ok=True)
    log_file = open(os.path.join(out_dir, "log.txt"), "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log


def save_results(out_dir: str, results: dict, markdown: str, name: str = "results") -> None:
    """``name``.json and ``name``.md under ``out_dir`` (made if missing)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
