"""When to fuse a layer's g / g-bar with its GEMM (async TP), per shape.

A column layer under SP computes ``all_gather(x) @ W^T``; a row layer ``reduce_scatter(x @ W^T)``.
Split into per-rank chunks, the collective overlaps the chunks' GEMMs, but each chunk is a smaller
GEMM plus a launch and a handshake, so for few tokens the unfused form wins. ``choose`` reads the
measured crossover (``TABLE``, docs/async_tp.md; written by benchmarks/async_tp_bench.py on the card
named there) and returns the implementation for one call:

    "off"          the plain collective, then (or after) the GEMM
    "ring"         chunks passed around the ranks with point-to-point sends on the communicator's own
                   stream while the GEMM runs on this one (any backend; gloo on CPU)
    "split"        the plain collective in flight beside part of the GEMM: the all-gather while this
                   rank's own rows are multiplied; the reduce-scatter in two halves of the output
                   columns, the first half's in flight while the second half's GEMM runs (any backend)
    "copy_engine"  ours over symmetric memory (``mpu.copy_engine``): peers' rows move by the CUDA copy
                   engines on a side stream while this rank's GEMM runs, so the transfer takes no SMs
    "symm_mem"     torch's symmetric-memory fused_all_gather_matmul / fused_matmul_reduce_scatter
                   (CUDA copy engines over NVLink; no multicast)

SP_CORE_ASYNC_TP=auto (default) | off | ring | split | copy_engine | symm_mem forces one everywhere
(tests, benchmarks);
SP_CORE_ASYNC_TP_TABLE=path.json replaces the table (re-tuning on another card).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List

from sp_core.mpu import platform

IMPLS = ("off", "ring", "split", "copy_engine", "symm_mem")
CUDA_ONLY = ("symm_mem", "copy_engine")
OPS = ("all_gather_matmul", "matmul_reduce_scatter")

# "collective backend:tp size" -> op -> [[rows, impl], ...] ascending: from ``rows`` all-token rows on, ``impl``
# (until the next step). Below the first step, or with no entry: never fuse. Measured with
# Qwen3-8B-shaped layers; docs/async_tp.md has the cards, the commands and the raw timings.
# t = 2: 2 x H200 (NVLink, multicast off), 2026-11-28, two calls averaged (async_tp_bench.py --decide-from).
# t = 4: 4 x H200, 2026-11-28, one call; its rule also chose "split" for the all-gather at 8K rows, which in
# the same call made prefill faster (x1.078 -> x1.016 of TP) but training slower (x1.080 -> x1.128): left off
# below 16K rows until more samples settle it.
TABLE: Dict[str, Dict[str, List[List[object]]]] = {
    "nccl:2": {"all_gather_matmul": [[8192, "split"], [16384, "copy_engine"]],
               "matmul_reduce_scatter": [[4096, "copy_engine"]]},
    "nccl:4": {"all_gather_matmul": [[16384, "split"]],
               "matmul_reduce_scatter": [[16384, "copy_engine"]]},
}


def _key(backend: str, t: int) -> str:
    return f"{backend}:{t}"


@functools.lru_cache(maxsize=None)
def _table_from(path: str) -> Dict[str, Dict[str, List[List[object]]]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"SP_CORE_ASYNC_TP_TABLE={path!r} is not a readable JSON decision table: {err}") from None


def table() -> Dict[str, Dict[str, List[List[object]]]]:
    path = os.environ.get("SP_CORE_ASYNC_TP_TABLE")
    return _table_from(path) if path else TABLE


def choose(op: str, rows: int, t: int) -> str:
    """The implementation for ``op`` over ``rows`` all-token rows at tp size ``t``."""
    forced = os.environ.get("SP_CORE_ASYNC_TP", "auto")
    if forced not in IMPLS + ("auto",):
        raise ValueError(f"SP_CORE_ASYNC_TP={forced!r} is not supported; use auto, {', '.join(IMPLS)}")
    if t == 1:
        return "off"
    if forced in CUDA_ONLY and not platform.symmetric_memory_ops_available():
        raise ValueError(f"SP_CORE_ASYNC_TP={forced} needs CUDA and torch's symmetric memory; use split, ring or off")
    if forced != "auto":
        return forced
    impl = "off"
    for from_rows, step_impl in table().get(_key(platform.backend(), t), {}).get(op, []):
        if rows >= int(from_rows):
            impl = str(step_impl)
    if impl not in IMPLS:
        raise ValueError(f"async-TP table names {impl!r} for {op} at t={t}; use one of {', '.join(IMPLS)}")
    if impl in CUDA_ONLY and not platform.symmetric_memory_ops_available():
        return "off"
    return impl
