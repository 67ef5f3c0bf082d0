"""Which fused kernel this platform has: the optional kernels' lookups (the pure-torch path where None).

SP_CORE_FUSED=0 turns every one off. The kernels themselves: ``triton_kernels`` (fused norm / rotary) and
``triton_batch_invariant`` (the deterministic mode's GEMM) on CUDA, torch_npu's on Ascend, apex's or torch's
fused RMSNorm. Devices, streams and AMP stay in ``sp_core.mpu.platform``.
"""
from __future__ import annotations

import functools

import torch

from sp_core import settings
from sp_core.mpu import platform


def fused_kernels_enabled() -> bool:
    """SP_CORE_FUSED=0 turns every optional fused kernel off (the pure-torch path everywhere)."""
    return settings.current().fused


def fused_rms_norm():
    """A fused RMSNorm callable ``(x, weight, eps) -> y`` for this platform, or None (pure torch).

    apex's FusedRMSNorm on CUDA where installed, else torch's fused ``F.rms_norm`` (float32 accumulation,
    one kernel; 5.5x the pure-torch norm on an 8192 x 4096 bf16 tensor, as measured on a GPU);
    torch_npu.npu_rms_norm on Ascend. The CPU path stays pure torch.
    """
    return _fused_rms_norm() if fused_kernels_enabled() else None


@functools.lru_cache(maxsize=None)
def _fused_rms_norm():
    kind = platform.device_type()
    if kind == "cuda":
        try:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine
        except Exception:
            return lambda x, weight, eps: torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
        return lambda x, weight, eps: fused_rms_norm_affine(x, weight, weight.shape, eps)
    if kind == "npu":
        import torch_npu

        return lambda x, weight, eps: torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]
    return None


def fused_add_rms_norm():
    """``(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)`` in one pass, inference
    only (no autograd), or None. Triton on CUDA, ``npu_add_rms_norm`` on Ascend."""
    return _fused_add_rms_norm() if fused_kernels_enabled() else None


@functools.lru_cache(maxsize=None)
def _fused_add_rms_norm():
    kind = platform.device_type()
    if kind == "cuda" and _has_triton():
        from sp_core.kernels import triton_kernels

        return triton_kernels.add_rms_norm
    if kind == "npu":
        import torch_npu

        def add_rms_norm(x, residual, weight, eps):
            y, _, added = torch_npu.npu_add_rms_norm(x, residual, weight, epsilon=eps)
            return y, added

        return add_rms_norm
    return None


def fused_qk_norm_rope():
    """``(q, k, q_weight | None, k_weight | None, eps, positions, inv_freq, factor) -> (q, k)``: per-head
    RMSNorm (Qwen3) and rotary in one pass over q and k, inference only, or None. Triton on CUDA."""
    return _fused_qk_norm_rope() if fused_kernels_enabled() else None


@functools.lru_cache(maxsize=None)
def _fused_qk_norm_rope():
    if platform.device_type() == "cuda" and _has_triton():
        from sp_core.kernels import triton_kernels

        return triton_kernels.qk_norm_rope
    return None


def batch_invariant_matmul(device: torch.device):
    """``(a [M, K], b [K, N]) -> a @ b`` on ``device`` whose rows do not depend on M, in one launch, or
    None (the deterministic mode then computes in fixed blocks of rows with torch). Triton on CUDA."""
    return _batch_invariant_matmul() if device.type == "cuda" and fused_kernels_enabled() else None


@functools.lru_cache(maxsize=None)
def _batch_invariant_matmul():
    if _has_triton():
        from sp_core.kernels import triton_batch_invariant

        return triton_batch_invariant.matmul
    return None


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def rotary_in_float32() -> bool:
    """The pure-torch path (CPU, or SP_CORE_FUSED=0) rotates in float32; with fused kernels on an
    accelerator, rotary runs in the input dtype, as HF's reference does (no float32 round trip)."""
    return platform.device_type() == "cpu" or not fused_kernels_enabled()


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
