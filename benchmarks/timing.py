"""Timing shared by the benchmarks: median milliseconds and peak activation memory of one call."""
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
