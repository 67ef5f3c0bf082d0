"""Device, collective backend, streams and AMP: the one place in mpu that names an accelerator.

CUDA -> NCCL, Ascend (torch_npu) -> HCCL, CPU -> gloo. Pure torch is the reference and the CPU path. Which
optional fused kernel runs on this platform is ``sp_core.kernels.lookup``'s question.
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


def memory_per_rank(world: int) -> tuple:
    """(bytes, what they are) one of ``world`` local ranks can hold at most: its device's memory (read without
    making a context: nothing is allocated), or on a CPU machine its share of the physical memory."""
    import os

    kind = device_type()
    if kind == "cuda":
        return torch.cuda.get_device_properties(0).total_memory, "device memory"
    if kind == "npu":
        return torch.npu.get_device_properties(0).total_memory, "device memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world, f"1/{world} of the physical memory"


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
