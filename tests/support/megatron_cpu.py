"""Test-only shims that let megatron-core 0.16.1 train on a CPU-only torch with gloo.

Never import this from library code. Call ``install_megatron_cpu_shims()`` inside each rank process
(e.g. at the top of the function given to ``support.multirank.run_ranks``) before building models;
it is idempotent and does nothing but return on a machine with CUDA.

What each shim stands in for (all are CUDA-only assumptions in megatron-core, none change numerics):

1. ``cpu_rng_tracker``: the model-parallel RNG tracker (``tensor_parallel.random``) snapshots
   ``torch.cuda`` RNG states even with dropout 0; here it tracks the CPU generator instead.
2. ``megatron_current_device_is_cpu``: ``torch.cuda.current_device()`` is used as a device in ~175
   places; it returns ``"cpu"`` only when called from a ``megatron.*`` module.
3. ``megatron_cuda_device_to_cpu``: hard-coded ``device="cuda"`` (schedules' token counter,
   FP32Optimizer's ``_scale``, the grad-norm helpers, the default causal mask) becomes ``"cpu"``,
   again only for calls made from ``megatron.*`` modules (a ``TorchFunctionMode``).

Not shimmed (avoid them on CPU): ``clip_grad > 0`` (``clip_grad_by_total_norm_fp32`` asserts
``torch.cuda.FloatTensor``: use ``OptimizerConfig(clip_grad=0.0)``), activation recompute (reads the
CUDA RNG state directly), the distributed optimizer, fp16/bf16 optimizers, the MoE alltoall
dispatcher, and fusions (set ``gradient_accumulation_fusion``, ``bias_activation_fusion``,
``masked_softmax_fusion``, ``bias_dropout_fusion``, ``apply_rope_fusion`` to False).

Sequence parallelism also needs ``SequenceParallelNorm`` in the layer spec (not a patch): megatron's
torch-norm fallback ``WrappedTorchNorm`` asserts ``not config.sequence_parallel`` (apex's
FusedLayerNorm is not installable here); see ``local_gpt_layer_spec``.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE = None


def _called_from_megatron(depth: int) -> bool:
    return sys._getframe(depth + 1).f_globals.get("__name__", "").startswith("megatron.")


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


# -- the SP-capable norm for specs -------------------------------------------------------------------

class SequenceParallelNorm:
    """``WrappedTorchNorm`` without its ``not config.sequence_parallel`` assert: a torch LayerNorm /
    RMSNorm whose parameters carry ``sequence_parallel = config.sequence_parallel``, so that
    ``finalize_model_grads`` sums their gradients over TP (apex's FusedLayerNorm does the same)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def local_gpt_layer_spec(**kwargs):
    """``get_gpt_layer_local_spec(**kwargs)`` with both layer norms replaced by ``SequenceParallelNorm``.
    For ``GPTModel`` pass ``TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=SequenceParallelNorm)``
    (the final norm must be SP-capable too)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(**kwargs)
    spec.submodules.input_layernorm = SequenceParallelNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    attention = getattr(spec.submodules.self_attention, "submodules", None)
    for name in ("q_layernorm", "k_layernorm"):  # per-head norms (qk_layernorm) use the same fallback
        if getattr(attention, name, None) is not None:
            setattr(attention, name, SequenceParallelNorm)
    return spec


def install_megatron_cpu_shims() -> None:
    """Apply shims 1-3 once per process (idempotent); a no-op where CUDA is available."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    cpu_rng_tracker()
    megatron_current_device_is_cpu()
    megatron_cuda_device_to_cpu()
    _INSTALLED = True
