"""Measured prefill crossover: the fewest tokens in a batch from which TP-SP is at least as fast as
plain TP (strong baseline for both, async TP as ``async_tp`` decides). Data for a serving adapter's
automatic SP threshold (vLLM's idea: below it, one all-reduce beats the gather + reduce-scatter pair).

Qwen3-8B-shaped layers, 4 x H100, 2026-11-27, docs/benchmarks.md ("Round 2"); token counts measured:
2K, 4K, 8K, 32K, so each entry is the smallest measured size at which SP was not slower.
"""
from __future__ import annotations

from typing import Optional

from sp_core.mpu import platform

# "collective backend:tp size" -> tokens
SP_PREFILL_MIN_TOKENS = {"nccl:2": 32768, "nccl:4": 8192}


def sp_prefill_min_tokens(t: int) -> Optional[int]:
    """The measured crossover for this platform at tp size ``t``, or None where none was measured."""
    return SP_PREFILL_MIN_TOKENS.get(f"{platform.backend()}:{t}")
