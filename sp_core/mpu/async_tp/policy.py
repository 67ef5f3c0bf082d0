"""When to fuse a layer's g / g-bar with its GEMM (async TP), per shape.

A column layer under SP computes ``all_gather(x) @ W^T``; a row layer ``reduce_scatter(x @ W^T)``.
Split into per-rank chunks, the collective overlaps the chunks' GEMMs, but each chunk is a smaller
GEMM plus a launch and a handshake, so for few tokens the unfused form wins. ``choose`` reads the
measured crossover (``TABLE``, docs/async_tp.md; written by benchmarks/async_tp_bench.py on the card
named there) and returns the implementation for one call (each in its own module of this package):

    "off"          the plain collective, then (or after) the GEMM
    "ring"         chunks passed around the ranks with point-to-point sends on the communicator's own
                   stream while the GEMM runs on this one (any backend; gloo on CPU)
    "split"        the plain collective in flight beside part of the GEMM: the all-gather while this
                   rank's own rows are multiplied; the reduce-scatter in two halves of the output
                   columns, the first half's in flight while the second half's GEMM runs (any backend)
    "copy_engine"  ours over symmetric memory (``transport``): peers' rows move by the CUDA copy
                   engines on a side stream while this rank's GEMM runs, so the transfer takes no SMs
    "symm_mem"     torch's symmetric-memory fused_all_gather_matmul / fused_matmul_reduce_scatter
                   (CUDA copy engines over NVLink; no multicast)

SP_CORE_ASYNC_TP=auto (default) | off | ring | split | copy_engine | symm_mem forces one for every context
made after it is read (``sp_core.settings``; tests and benchmarks pass their own ``Settings``);
SP_CORE_ASYNC_TP_TABLE=path.json replaces the table (re-tuning on another card).
"""
from __future__ import annotations

import functools
import json
from typing import Dict, List

from sp_core.mpu import platform
from sp_core.mpu.async_tp import copy_engine, off, ring, split, symm_mem

IMPLS = ("off", "ring", "split", "copy_engine", "symm_mem")
CUDA_ONLY = ("symm_mem", "copy_engine")
OPS = ("all_gather_matmul", "matmul_reduce_scatter")
FORMS = {"off": off, "ring": ring, "split": split, "copy_engine": copy_engine, "symm_mem": symm_mem}

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


class Policy:
    """One context's choice of form per call: forced (``settings.async_tp``), or the measured table's step
    for the op, the rows and this platform's backend at the context's tp size. A context with a framework
    communicator keeps the plain collectives (they go through it, as the framework would issue them), and
    so does the deterministic mode (its sums are the rank-order ones; a fused ring sums in the owner's order)."""

    def __init__(self, forced: str, steps: Dict[str, List[List[object]]], t: int):
        self.forced, self.steps, self.t = forced, steps, t

    @classmethod
    def for_context(cls, parallel) -> "Policy":
        if parallel.size == 1 or parallel.communicator is not None or parallel.deterministic:
            return cls("off", {}, parallel.size)
        s = parallel.settings
        if s.async_tp in CUDA_ONLY and not platform.symmetric_memory_ops_available():
            raise ValueError(f"SP_CORE_ASYNC_TP={s.async_tp} needs CUDA and torch's symmetric memory; "
                             f"use split, ring or off")
        table = _table_from(s.async_tp_table) if s.async_tp_table else TABLE
        return cls(s.async_tp, table.get(_key(platform.backend(), parallel.size), {}), parallel.size)

    def choose(self, op: str, rows: int) -> str:
        """The form's name for ``op`` over ``rows`` all-token rows."""
        if self.forced != "auto":
            return self.forced
        impl = "off"
        for from_rows, step_impl in self.steps.get(op, []):
            if rows >= int(from_rows):
                impl = str(step_impl)
        if impl not in IMPLS:
            raise ValueError(f"async-TP table names {impl!r} for {op} at t={self.t}; use one of {', '.join(IMPLS)}")
        if impl in CUDA_ONLY and not platform.symmetric_memory_ops_available():
            return "off"
        return impl

    def form(self, op: str, rows: int, columns: int = 0):
        """The module of the chosen form (``all_gather_matmul`` / ``matmul_reduce_scatter``); "split" needs
        an even number of output columns for its halves."""
        impl = self.choose(op, rows)
        if impl == "split" and op == "matmul_reduce_scatter" and columns % 2 != 0:
            impl = "off"
        return FORMS[impl]
