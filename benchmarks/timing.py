"""Timing shared by the benchmarks: median milliseconds and peak activation memory of one call, and the
plot of the resulting TP-SP / TP time ratios."""
from __future__ import annotations

import statistics
import time

import torch


def timed(fn, iters: int, warmup: int = 3):
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` (device events on CUDA, the
    host clock around a synchronize elsewhere), and the peak bytes allocated above the starting point
    during one more call (0 off CUDA)."""
    from sp_core.mpu import collectives, platform

    for _ in range(warmup):
        fn()
    platform.synchronize()
    collectives.barrier()
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
    collectives.barrier()
    before = torch.cuda.memory_allocated() if cuda else 0
    platform.reset_peak_memory()
    fn()
    platform.synchronize()
    peak = platform.max_memory_allocated() - before if cuda else 0
    return statistics.median(times), peak


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
    import os

    os.makedirs(out_dir, exist_ok=True)
    log_file = open(os.path.join(out_dir, "log.txt"), "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log


def save_results(out_dir: str, results: dict, markdown: str) -> None:
    """``results.json`` and ``results.md`` under ``out_dir``."""
    import json
    import os

    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown)
