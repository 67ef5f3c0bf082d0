"""The sglang plugin (entry-point group ``sglang.srt.plugins``). sglang calls ``load_plugin()`` once in
every process it starts (engine, each TP scheduler, detokenizer).

Opt-in: nothing happens unless the environment has ``SP_CORE_SGLANG=1``, so with sp-core installed and
the variable unset sglang behaves exactly as before. When enabled, sp_core's model classes replace
sglang's for the architectures the core supports, and ``--enable-layernorm-sp`` accepts them.

Start-up: sglang builds its model registry by importing every module of ``sglang.srt.models`` (~260, a few
seconds in each worker, and the "Ignore import error" lines). sglang's ``SGLANG_EXTERNAL_MODEL_PACKAGE``
("defer default model imports to speed up startup when using external models") registers one package
instead and imports the defaults only when an architecture is not found in it; ``ENGINE_ENV`` is what an
engine serving through the adapter sets for its workers (``cli_engine.engine.start_engine``).
"""
from __future__ import annotations

from sp_core import settings

ENABLE_ENV = "SP_CORE_SGLANG"
MODELS_PACKAGE = "sp_core_sglang.models"
ENGINE_ENV = {ENABLE_ENV: "1", "SGLANG_EXTERNAL_MODEL_PACKAGE": MODELS_PACKAGE}


def requested() -> bool:
    return settings.read().sglang_plugin  # read when sglang asks: the engine launcher sets it for its workers


def load_plugin() -> None:
    if requested():
        enable()


def enable() -> None:
    """Register the core's model classes and extend sglang's layernorm-SP allowlist (idempotent).

    sglang's own checks for ``--enable-layernorm-sp`` (tp > 1, no attention DP, no speculative
    decoding, pp = 1) still run; the allowlist is read when they run, so extending it here suffices.
    """
    from sglang.srt.layers import layernorm_sp
    from sglang.srt.models.registry import ModelRegistry, import_model_classes

    from sp_core.models import SUPPORTED_ARCHITECTURES
    from sp_core_sglang import control, deterministic, options

    ours = import_model_classes(MODELS_PACKAGE, strict=True)
    if any(ModelRegistry.models.get(arch) is not cls for arch, cls in ours.items()):  # not registered at import
        ModelRegistry.register(MODELS_PACKAGE, overwrite=True, strict=True)
    layernorm_sp.SP_SUPPORTED_ARCHITECTURES = layernorm_sp.SP_SUPPORTED_ARCHITECTURES | frozenset(
        SUPPORTED_ARCHITECTURES)
    options.register()
    deterministic.register()
    control.register()
