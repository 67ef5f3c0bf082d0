"""Device, collective backend and optional fused kernels: the one place that names an accelerator.

CUDA -> NCCL, Ascend (torch_npu) -> HCCL, CPU -> gloo. Pure torch is the reference and the CPU path.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _has_npu() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:
        return False
    return bool(getattr(torch, "npu", None)) and torch.npu.is_available()


def device_type() -> str:
    """'cuda', 'npu' or 'cpu'. SP_CORE_DEVICE=cpu forces the CPU path on an accelerator machine."""
    forced = os.environ.get("SP_CORE_DEVICE")
    if forced:
        if forced not in ("cuda", "npu", "cpu"):
            raise ValueError(f"SP_CORE_DEVICE={forced!r} is not supported; use cuda, npu or cpu")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if _has_npu():
        return "npu"
    return "cpu"


def backend() -> str:
    return {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}[device_type()]


def device_count() -> int:
    kind = device_type()
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count()
    return 0


def local_device(local_rank: int = 0) -> torch.device:
    kind = device_type()
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, local_rank)


def set_device(local_rank: int) -> torch.device:
    kind = device_type()
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
    elif kind == "npu":
        torch.npu.set_device(local_rank)
    return local_device(local_rank)


def synchronize() -> None:
    kind = device_type()
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "npu":
        torch.npu.synchronize()


def max_memory_allocated() -> int:
    kind = device_type()
    if kind == "cuda":
        return torch.cuda.max_memory_allocated()
    if kind == "npu":
        return torch.npu.max_memory_allocated()
    return 0


def reset_peak_memory() -> None:
    kind = device_type()
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif kind == "npu":
        torch.npu.reset_peak_memory_stats()


@functools.lru_cache(maxsize=None)
def fused_rms_norm():
    """A fused RMSNorm callable ``(x, weight, eps) -> y`` for this platform, or None (pure torch).

    apex's FusedRMSNorm on CUDA, torch_npu.npu_rms_norm on Ascend. Both optional; SP_CORE_FUSED=0 turns them off.
    """
    if os.environ.get("SP_CORE_FUSED", "1") == "0":
        return None
    kind = device_type()
    if kind == "cuda":
        try:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine
        except Exception:
            return None
        return lambda x, weight, eps: fused_rms_norm_affine(x, weight, weight.shape, eps)
    if kind == "npu":
        import torch_npu

        return lambda x, weight, eps: torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]
    return None


def current_device() -> torch.device:
    kind = device_type()
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if kind == "npu":
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def grouped_mm_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm(x, weight)`` runs here: CPU (torch >= 2.13, measured) takes float32 and
    bfloat16, CUDA bfloat16 on sm90 (H100 / H200; ragged groups, empty ones included, need no padding in
    bf16: torchtitan #2255; sm100 with empty groups may need pytorch #172439, so it loops for now); both
    want every row 16-byte aligned. Otherwise the caller loops over the groups."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cpu":
        dtypes = (torch.float32, torch.bfloat16)
    elif x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] == 9:
        dtypes = (torch.bfloat16,)
    else:
        return False
    width = x.element_size()
    return x.dtype in dtypes and all(n * width % 16 == 0 for n in (weight.shape[1], weight.shape[2]))
