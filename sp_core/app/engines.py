"""Engines that compute prompt log-probabilities: the core itself, and whatever adapters register in
the entry-point group ``sp_core.engines`` (megatron, sglang). sp_core never imports an adapter."""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch

from sp_core.app.errors import EngineUnavailable, NonFiniteError
from sp_core.app.prompts import read_prompts
from sp_core.app.runtime import load_model, prompt_logprobs
from sp_core.models import ModelConfig, ModelError

__all__ = ["EngineUnavailable", "available", "get", "prepare", "Prepared", "check_model", "check_finite"]


def core_logprobs(model_dir: str, prompts, tp: int, sequence_parallel: bool, dtype: torch.dtype,
                  moe_parallel: str = "tp", deterministic: bool = False, cp: int = 1) -> List[torch.Tensor]:
    """On cp x tp ranks (TP innermost)."""
    from sp_core.procs.launch import add_preload, run_ranks

    add_preload("sp_core.app.runtime")  # the model code every rank builds with: once in the fork server
    return run_ranks(cp * tp, _core_rank, model_dir, prompts, dtype, moe_parallel, deterministic,
                     sequence_parallel=sequence_parallel, tp=tp, cp=cp)[0]


def _core_rank(model_dir, prompts, dtype, moe_parallel="tp", deterministic=False):
    from sp_core import mpu

    parallel = mpu.default_context().replace(deterministic=deterministic)
    return prompt_logprobs(load_model(model_dir, dtype, moe_parallel, parallel), prompts)


# Architectures an engine does not run yet (none at the moment: every engine runs every supported one).
NOT_YET: Dict[str, tuple] = {}
MOE_PARALLEL_ENGINES = ("core", "megatron", "sglang")  # engines that take --moe-parallel ep (sglang: as its --ep-size)
CP_ENGINES = ("core", "megatron")  # engines that take --cp N > 1 (their logprobs take ``cp``)
CP_REFUSED = {"sglang": "sglang's prefill context parallelism (--attn-cp-size) is GPU / NPU-only and the sp_core "
                        "sglang models refuse attn_cp_size > 1"}


def check_engine(name: str, cfg: ModelConfig, moe_parallel: str = "tp", cp: int = 1) -> None:
    """Whether engine ``name`` runs this model (bad input otherwise, exit 2: an architecture this engine does
    not support yet, or an option it does not take)."""
    if cfg.architecture in NOT_YET.get(name, ()):
        raise ModelError(f"engine {name!r} does not run {cfg.architecture} yet; use --engine core")
    if name not in MOE_PARALLEL_ENGINES and moe_parallel != "tp":
        raise ModelError(f"--moe-parallel {moe_parallel} is an option of the {' and '.join(MOE_PARALLEL_ENGINES)} "
                         f"engines only")
    if cp > 1 and name not in CP_ENGINES:
        why = f": {CP_REFUSED[name]}" if name in CP_REFUSED else ""
        raise ModelError(f"--cp {cp}: engine {name!r} runs cp 1 only{why}; context parallelism runs in the "
                         f"{' and '.join(CP_ENGINES)} engine{'s' if len(CP_ENGINES) > 1 else ''}")


def available() -> Dict[str, object]:
    """name -> engine module (or entry point to one). An engine has ``logprobs(model_dir, prompts, tp,
    sequence_parallel, dtype, deterministic=False) -> [Tensor]``; the megatron engine also has ``train(args) -> int``;
    an engine may offer ``reusing()``, a context inside which ``logprobs`` keeps what it started for the next call
    with the same checkpoint (``verify`` runs its rows inside it), and ``warm_up()``, which starts in the background
    what its first call needs (``verify`` calls it before its first row)."""
    engines: Dict[str, object] = {"core": SimpleNamespace(logprobs=core_logprobs)}
    for ep in metadata.entry_points(group="sp_core.engines"):
        engines[ep.name] = ep
    return engines


def get(name: str):
    engines = available()
    if name not in engines:
        raise ModelError(f"unknown engine {name!r}; available: {', '.join(sorted(engines))}")
    entry = engines[name]
    if isinstance(entry, metadata.EntryPoint):
        try:
            return entry.load()
        except ImportError as err:
            raise EngineUnavailable(f"engine {name!r} needs a framework that is not installed ({err}): "
                                    f"pip install 'sp-core[{name}]'") from None
    return entry


def check_model(model_dir: str, tp: int, moe_parallel: str = "tp", moe_flag: str = "--moe-parallel") -> ModelConfig:
    """The config, the tp split and the checkpoint's tensors (names, shapes, readable files), checked in
    this process before any rank or engine starts: one-line ModelError otherwise (``moe_flag``: the flag
    that set ``moe_parallel``, named in it)."""
    from sp_core.models import CausalLM
    from sp_core.models.checkpoint import check_checkpoint
    from sp_core.mpu import single_rank

    if not os.path.isdir(model_dir):
        raise ModelError(f"{model_dir}: no such checkpoint directory")
    cfg = ModelConfig.from_pretrained(model_dir, moe_parallel)
    cfg.check_tp(tp, moe_flag)
    with torch.device("meta"):
        model = CausalLM(cfg, parallel=single_rank())
    check_checkpoint(model, model_dir)
    return cfg


@dataclass(frozen=True)
class Prepared:
    """What a command needs before its real call (``prepare``)."""

    config: ModelConfig
    engine: Optional[object] = None  # the engine module, when an engine was named
    prompts: Optional[List[List[int]]] = None  # the prompts file's token ids, when one was given


def prepare(model_dir: str, tp: int, moe_parallel: str = "tp", engine: Optional[str] = None,
            prompts_path: Optional[str] = None, cp: int = 1) -> Prepared:
    """A command's preparation, in this process before any rank or engine starts (one-line ModelError or
    EngineUnavailable otherwise): the checkpoint at this tp (``check_model``); with ``engine``, that the engine
    runs this model (``check_engine``); with ``prompts_path``, the prompts read and checked against the model;
    then the engine loaded (``get``)."""
    cfg = check_model(model_dir, tp, moe_parallel)
    if engine is not None:
        check_engine(engine, cfg, moe_parallel, cp)
    prompts = read_prompts(prompts_path, cfg) if prompts_path is not None else None
    return Prepared(cfg, get(engine) if engine is not None else None, prompts)


def check_finite(logprobs: List[torch.Tensor], what: str = "log-probabilities") -> None:
    """NaN or inf in an engine's output is an error, never a result."""
    for i, lp in enumerate(logprobs):
        if not torch.isfinite(lp).all():
            raise NonFiniteError(f"the {what} of prompt {i} contain NaN or inf (weights with NaN/inf, or an "
                                 f"overflow in this dtype)")
