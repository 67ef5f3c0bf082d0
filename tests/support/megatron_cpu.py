"""Test-only helpers for megatron-core's own GPTModel on CPU (the reference in Megatron tests).

Never import this from library code. What training itself needs on CPU lives in the adapter
(``sp_core_megatron.cli_engine.cpu_training``); ``install_megatron_cpu_shims`` applies it in a rank process.

Sequence parallelism in megatron's local spec needs ``SequenceParallelNorm`` (not a patch): megatron's
torch-norm fallback ``WrappedTorchNorm`` asserts ``not config.sequence_parallel`` (apex's
FusedLayerNorm is not installable here); see ``local_gpt_layer_spec``.
"""
from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode


def install_megatron_cpu_shims() -> None:
    from sp_core_megatron.cli_engine import cpu_training

    cpu_training.enable()


_CLIP_GRADS = "megatron.core.optimizer.clip_grads"


class _CpuGradsPassClipAssert(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].dtype == torch.float32
                and _CLIP_GRADS in (sys._getframe(d).f_globals.get("__name__") for d in range(1, 6))):
            return "torch.cuda.FloatTensor"
        return func(*args, **(kwargs or {}))


def allow_cpu_grad_clipping() -> None:
    """Inside a rank, before ``install_megatron_cpu_shims`` (their mode reads its caller's frame, so it must
    stay on top; it then calls into this one): megatron's own ``clip_grad_by_total_norm_fp32`` runs on CPU
    gradients. It asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``, its one CUDA assumption that
    the shims leave (its ``device='cuda'`` buffer they redirect)."""
    _CpuGradsPassClipAssert().__enter__()  # left on for the life of the rank process


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


# -- the distributed optimizer on CPU ----------------------------------------------------------------

def distributed_optimizer_on_cpu() -> None:
    """``DistributedOptimizer`` accepts only parameters whose ``Tensor.type()`` names a CUDA type (it
    checks the string): for calls from ``megatron.*`` a CPU tensor's type reads ``torch.cuda.*``.
    Everything else it does runs on gloo as is. Also ``_torch_adam_step_is_not_loaded``."""
    import sys

    original = torch.Tensor.type
    if getattr(original, "_sp_core_cpu", False):
        return

    def type_(self, *args, **kwargs):
        if (not args and not kwargs and self.device.type == "cpu"
                and sys._getframe(1).f_globals.get("__name__", "").startswith("megatron.")):
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, *args, **kwargs)

    type_._sp_core_cpu = True
    torch.Tensor.type = type_
    _torch_adam_step_is_not_loaded()


def _torch_adam_step_is_not_loaded() -> None:
    """Without apex / Transformer Engine (torch Adam: the CPU, and the GPU image), megatron-core's
    ``_set_main_param_and_optimizer_states`` copies every state key, torch Adam's ``step`` too, from loaded
    tensors that never hold it (``load_state_dict`` has already set it from the param groups): skip it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            state["step"] = state["step"].clone()
            tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def adam_state_before_loading(optimizer) -> None:
    """Without apex / Transformer Engine, ``DistributedOptimizer.state_dict()`` (called by
    ``sharded_state_dict(is_loading=True)``) asserts one ``step`` among torch Adam's states, which a fresh
    optimizer has none of: give each parameter zero state at step 0; loading overwrites all of it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                if not inner.optimizer.state[p]:
                    inner.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                                "exp_avg_sq": torch.zeros_like(p)}
