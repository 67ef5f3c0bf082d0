"""Measured prefill crossover: the fewest tokens in a batch from which TP-SP is at least as fast as
plain TP, per model family and platform. Data for a serving adapter's automatic SP threshold (vLLM's
idea: below it, one all-reduce beats the gather + reduce-scatter pair).

- "qwen": Qwen3-8B-shaped layers, 4 x H100, 2026-11-27, docs/benchmarks.md ("Round 2"; strong baseline
  for both, async TP as ``async_tp`` decides); sizes measured 2K, 4K, 8K, 32K.
- "deepseek" (every MLA model: V2, V2-Lite, V3, V3.2): DeepSeek-V3-shaped layers (1 dense + 3 MoE, MoE
  mode (a), TP-sharded experts: the core's default), docs/benchmarks.md ("DeepSeek, round 2"), sizes 2K,
  4K, 8K, 32K. t = 2 (2 x H200): x1.01 at 4K, x0.97 from 8K. t = 4 (4 x H200): x1.27 at 4K, x0.97 at 8K,
  x0.93 at 32K (EP: the same crossover).

Each entry is the smallest measured size from which SP was not slower at every larger measured size.
"""
from __future__ import annotations

from typing import Optional

from sp_core.mpu import platform

# family -> "collective backend:tp size" -> tokens
SP_PREFILL_MIN_TOKENS = {
    "qwen": {"nccl:2": 32768, "nccl:4": 8192},
    "deepseek": {"nccl:2": 8192, "nccl:4": 8192},
}


def family(cfg) -> str:
    """The crossover table's key for a ``ModelConfig``: "deepseek" for MLA models, else "qwen"."""
    return "deepseek" if getattr(cfg, "mla", None) is not None else "qwen"


def sp_prefill_min_tokens(t: int, model_family: str = "qwen") -> Optional[int]:
    """The measured crossover for this platform, tp size ``t`` and model family, or None where none was
    measured."""
    return SP_PREFILL_MIN_TOKENS.get(model_family, {}).get(f"{platform.backend()}:{t}")
