"""Device, collective backend and optional fused kernels: the one place that names an accelerator.

CUDA -> NCCL, Ascend (torch_npu) -> HCCL, CPU -> gloo. Pure torch is the reference and the CPU path.
"""
from __future__ import annotations

import functools

import torch

from sp_core import settings


@functools.lru_cache(maxsize=None)
def _has_npu() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:
        return False
    return bool(getattr(torch, "npu", None)) and torch.npu.is_available()


def device_type() -> str:
    """'cuda', 'npu' or 'cpu'. SP_CORE_DEVICE=cpu forces the CPU path on an accelerator machine."""
    forced = settings.current().device
    if forced:
        return forced
    return _detected_device_type()


@functools.lru_cache(maxsize=None)
def _detected_device_type() -> str:
    """The accelerator this process sees (asked once: layers ask on every call)."""
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
    kind = device_type()
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
    kind = device_type()
    if kind == "cuda" and _has_triton():
        from sp_core.layers import triton_kernels

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
    if device_type() == "cuda" and _has_triton():
        from sp_core.layers import triton_kernels

        return triton_kernels.qk_norm_rope
    return None


def batch_invariant_matmul(device: torch.device):
    """``(a [M, K], b [K, N]) -> a @ b`` on ``device`` whose rows do not depend on M, in one launch, or
    None (the deterministic mode then computes in fixed blocks of rows with torch). Triton on CUDA."""
    return _batch_invariant_matmul() if device.type == "cuda" and fused_kernels_enabled() else None


@functools.lru_cache(maxsize=None)
def _batch_invariant_matmul():
    if _has_triton():
        from sp_core.layers import triton_batch_invariant

        return triton_batch_invariant.matmul
    return None


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def symmetric_memory_ops_available() -> bool:
    """torch's symmetric-memory fused all-gather+matmul / matmul+reduce-scatter (CUDA, NCCL group).
    They copy over NVLink with the copy engines and need no multicast (which stays off here)."""
    return device_type() == "cuda" and _symmetric_memory_ops_registered()


@functools.lru_cache(maxsize=None)
def _symmetric_memory_ops_registered() -> bool:
    try:
        import torch.distributed._symmetric_memory  # noqa: F401  (defines torch.ops.symm_mem's fused ops)
    except Exception:
        return False
    return hasattr(torch.ops.symm_mem, "fused_all_gather_matmul")


def rotary_in_float32() -> bool:
    """The pure-torch path (CPU, or SP_CORE_FUSED=0) rotates in float32; with fused kernels on an
    accelerator, rotary runs in the input dtype, as HF's reference does (no float32 round trip)."""
    return device_type() == "cpu" or not fused_kernels_enabled()


def _stream_module():
    """torch.cuda or torch.npu: whose streams ``current_stream`` / ``side_stream`` / ``on_stream`` are."""
    return torch.npu if device_type() == "npu" else torch.cuda


def current_stream():
    return _stream_module().current_stream()


@functools.lru_cache(maxsize=None)
def side_stream(device_index: int):
    """A second stream on this device, made once: for transfers beside the compute stream (async TP)."""
    return _stream_module().Stream(device=device_index)


def on_stream(stream):
    """A context in which ops run on ``stream``."""
    return _stream_module().stream(stream)


def capturing_graph() -> bool:
    """Whether the current stream is being captured into a CUDA graph."""
    return device_type() == "cuda" and torch.cuda.is_current_stream_capturing()


def current_device() -> torch.device:
    kind = device_type()
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if kind == "npu":
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def amp_forward(forward):
    """``torch.amp.custom_fwd`` for this platform's device: an autograd Function's forward records the
    autocast state it ran under, so that its backward (``amp_backward``) runs under the same state.
    Written out rather than wrapping torch's pair, whose backward enters an autocast context on every
    call even where autocast is off in both passes (a host cost on every collective's backward)."""

    @functools.wraps(forward)
    def wrapper(ctx, *args, **kwargs):
        device = device_type()
        ctx.amp_state = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return forward(ctx, *args, **kwargs)

    return wrapper


def amp_backward(backward):
    """``torch.amp.custom_bwd`` for this platform's device (see ``amp_forward``): the backward runs under
    the forward's autocast state; where autocast is off then and now, there is nothing to enter."""

    @functools.wraps(backward)
    def wrapper(ctx, *args, **kwargs):
        device, enabled, dtype = ctx.amp_state
        if not enabled and not torch.is_autocast_enabled(device):
            return backward(ctx, *args, **kwargs)
        with torch.autocast(device_type=device, enabled=enabled, dtype=dtype):
            return backward(ctx, *args, **kwargs)

    return wrapper


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
