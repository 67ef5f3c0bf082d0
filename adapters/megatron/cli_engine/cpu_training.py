"""What megatron-core 0.16's training path needs on a CPU-only machine (gloo), applied by ``enable()``.

``sp-core train`` and the megatron engine call ``enable()`` inside each rank process; it does nothing on
a machine with an accelerator, and nothing happens on import. megatron-core assumes CUDA in three places
that matter for training; each fix below redirects only calls made from ``megatron.*`` modules and
changes no numerics:

1. ``cpu_rng_tracker``: the model-parallel RNG tracker (``tensor_parallel.random``) snapshots
   ``torch.cuda`` RNG states even with dropout 0; here it tracks the CPU generator instead.
2. ``megatron_current_device_is_cpu``: ``torch.cuda.current_device()`` is used as a device in ~175
   places; it returns ``"cpu"`` when called from a ``megatron.*`` module.
3. ``megatron_cuda_device_to_cpu``: hard-coded ``device="cuda"`` (schedules' token counter,
   FP32Optimizer's ``_scale``, the grad-norm helpers, the default causal mask) becomes ``"cpu"`` for
   calls made from ``megatron.*`` modules (a ``TorchFunctionMode``, left on for the process's life);
   in the same mode ``tensor.type()`` called from megatron's optimizer modules names a CPU tensor's CUDA
   type (``torch.cuda.BFloat16Tensor``): the bf16 optimizer (``Float16OptimizerWithFloat16Params``,
   Megatron's ``--bf16``) sorts the parameters it keeps float32 main copies of by those names.

4. ``megatron_cuda_synchronize_is_noop``: ``dist_checkpointing``'s torch_dist save strategy calls
   ``torch.cuda.synchronize()`` before copying tensors to the host; with no device there is nothing
   to wait for, so calls from ``megatron.*`` return at once.

Not covered (the CPU training path avoids them): ``clip_grad > 0`` (``clip_grad_by_total_norm_fp32``
asserts ``torch.cuda.FloatTensor``), activation recompute, the distributed optimizer, the fp16 optimizer
(its grad scaler), the MoE alltoall dispatcher, and fusions.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE = None


def _caller_module(depth: int) -> str:
    return sys._getframe(depth + 1).f_globals.get("__name__", "")


def _called_from_megatron(depth: int) -> bool:
    return _caller_module(depth + 1).startswith("megatron.")


# the modules whose parameter sorting by ``tensor.type()`` names must see CUDA types (fix 3)
_OPTIMIZERS = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer")


# -- 1. RNG tracker ----------------------------------------------------------------------------------

def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """``CudaRNGStatesTracker`` on the CPU default generator (same names, seeds and fork API)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state, orig_name = torch.get_rng_state(), self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def cpu_rng_tracker() -> None:
    """Stands in for the CUDA RNG in ``megatron.core.tensor_parallel.random``.

    ``get_cuda_rng_tracker()`` / ``model_parallel_cuda_manual_seed()`` build their tracker from the
    module-global ``CudaRNGStatesTracker``; it is replaced by a subclass that seeds and forks CPU
    generator states (``torch.cuda.manual_seed`` there is a lazy no-op on a CPU build). An existing
    CUDA tracker is dropped so the next ``get_cuda_rng_tracker()`` builds a CPU one.
    """
    from megatron.core.tensor_parallel import random as mrandom

    if getattr(mrandom.CudaRNGStatesTracker, "_sp_core_cpu", False):
        return
    cls = _cpu_rng_tracker_class()
    cls._sp_core_cpu = True
    mrandom.CudaRNGStatesTracker = cls
    mrandom.initialize_rng_tracker(force_reset=True)


# -- 2. torch.cuda.current_device() ------------------------------------------------------------------

def megatron_current_device_is_cpu() -> None:
    """Stands in for ``torch.cuda.current_device()`` (an int on CUDA) where megatron uses it as a
    device (parameter and grad-buffer allocation, ``.to(...)``). Only callers in ``megatron.*``
    get ``"cpu"``; everyone else still gets torch's own function (which raises without CUDA)."""
    original = torch.cuda.current_device
    if getattr(original, "_sp_core_cpu", False):
        return

    def current_device():
        if _called_from_megatron(1):
            return "cpu"
        return original()

    current_device._sp_core_cpu = True
    current_device.__wrapped__ = original
    torch.cuda.current_device = current_device


# -- 3. device="cuda" --------------------------------------------------------------------------------

def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


class _MegatronCudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")) and _called_from_megatron(1):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and _caller_module(1) in _OPTIMIZERS:
            name = func(*args)  # "torch.BFloat16Tensor" -> "torch.cuda.BFloat16Tensor"
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def megatron_cuda_device_to_cpu() -> None:
    """Stands in for hard-coded ``device="cuda"`` in megatron (``schedules.py`` total_num_tokens,
    ``FP32Optimizer._scale``, ``clip_grads.get_grad_norm_fp32``, ``transformer/utils.py`` causal
    masks): a process-wide ``TorchFunctionMode`` that rewrites a ``device=`` keyword naming CUDA to
    ``"cpu"`` for calls made from ``megatron.*`` modules. Torch function modes are per thread; the
    CPU autograd engine runs backward on the calling thread, so one install per rank is enough."""
    global _MODE
    if _MODE is not None:
        return
    _MODE = _MegatronCudaToCpu()
    _MODE.__enter__()  # left on for the life of the (test) rank process


# -- 4. torch.cuda.synchronize() ---------------------------------------------------------------------

def megatron_cuda_synchronize_is_noop() -> None:
    original = torch.cuda.synchronize
    if getattr(original, "_sp_core_cpu", False):
        return

    def synchronize(device=None):
        if _called_from_megatron(1):
            return None
        return original(device)

    synchronize._sp_core_cpu = True
    synchronize.__wrapped__ = original
    torch.cuda.synchronize = synchronize


def enable() -> None:
    """Apply fixes 1-4 in this (rank) process, once; a no-op unless sp_core runs on CPU."""
    global _INSTALLED
    from sp_core.mpu import platform

    if _INSTALLED or platform.device_type() != "cpu":
        return
    cpu_rng_tracker()
    megatron_current_device_is_cpu()
    megatron_cuda_device_to_cpu()
    megatron_cuda_synchronize_is_noop()
    _INSTALLED = True
