"""Megatron's extension points: a ModuleSpec for megatron.core users, and a model provider for
Megatron-LM's training loop that honours --sp-core (off: the user's own provider, untouched)."""
from __future__ import annotations

from typing import Callable, Optional

from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from sp_core_megatron.model import SPCoreGPTModel


def get_sp_core_model_spec() -> ModuleSpec:
    """``build_module(get_sp_core_model_spec(), config=SPCoreTransformerConfig(...))`` -> SPCoreGPTModel."""
    return ModuleSpec(module=SPCoreGPTModel)


def build_model(config, pre_process: bool = True, post_process: bool = True, pg_collection=None):
    """For megatron.core users: the core's model when ``config.sp_core`` is set. ``pg_collection``:
    Megatron's process groups (default: those of ``megatron.core.parallel_state``)."""
    if not getattr(config, "sp_core", False):
        raise ValueError("config.sp_core is off; build Megatron's own GPTModel instead")
    return build_module(get_sp_core_model_spec(), config=config, pre_process=pre_process, post_process=post_process,
                        pg_collection=pg_collection)


def make_model_provider(fallback: Callable, config_from_args: Optional[Callable] = None) -> Callable:
    """Wrap Megatron-LM's ``model_provider``: with ``--sp-core`` the core's model, otherwise ``fallback``.

    ``config_from_args(args)`` builds the TransformerConfig (Megatron-LM's
    ``core_transformer_config_from_args`` by default); its fields are copied into an SPCoreTransformerConfig.
    """

    def model_provider(pre_process: bool = True, post_process: bool = True, *args, **kwargs):
        from megatron.training import get_args  # Megatron-LM only; megatron.core users call build_model

        margs = get_args()
        if not getattr(margs, "sp_core", False):
            return fallback(pre_process, post_process, *args, **kwargs)
        if config_from_args is None:
            from megatron.training.arguments import core_transformer_config_from_args as make_config
        else:
            make_config = config_from_args
        return build_model(as_sp_core_config(make_config(margs), margs.sp_core_hf_model), pre_process, post_process,
                           kwargs.get("pg_collection"))

    return model_provider


def as_sp_core_config(config, hf_model_dir: str):
    import dataclasses

    from sp_core_megatron.config import SPCoreTransformerConfig

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and hasattr(config, f.name)}
    fields.update(sp_core=True, sp_core_hf_model=hf_model_dir)
    return SPCoreTransformerConfig(**fields)
