"""Engines that compute prompt log-probabilities: the core itself, and whatever adapters register in
the entry-point group ``sp_core.engines`` (megatron, sglang). sp_core never imports an adapter."""
from __future__ import annotations

import json
import os
from importlib import metadata
from types import SimpleNamespace
from typing import Dict, List

import torch

from sp_core.app.errors import EngineUnavailable, NonFiniteError
from sp_core.models import ModelConfig, ModelError

__all__ = ["EngineUnavailable", "available", "get", "read_prompts", "check_prompts", "check_model",
           "check_finite"]


def core_logprobs(model_dir: str, prompts, tp: int, sequence_parallel: bool, dtype: torch.dtype,
                  moe_parallel: str = "tp", deterministic: bool = False) -> List[torch.Tensor]:
    from sp_core.mpu.launch import run_ranks

    return run_ranks(tp, _core_rank, model_dir, prompts, dtype, moe_parallel, deterministic,
                     sequence_parallel=sequence_parallel)[0]


def _core_rank(model_dir, prompts, dtype, moe_parallel="tp", deterministic=False):
    from sp_core import mpu
    from sp_core.app.runtime import load_model, prompt_logprobs

    mpu.set_deterministic(deterministic)
    return prompt_logprobs(load_model(model_dir, dtype, moe_parallel), prompts)


# Architectures an engine does not run yet (none at the moment: every engine runs every supported one).
NOT_YET: Dict[str, tuple] = {}
MOE_PARALLEL_ENGINES = ("core", "megatron", "sglang")  # engines that take --moe-parallel ep (sglang: as its --ep-size)


def check_engine(name: str, cfg: ModelConfig, moe_parallel: str = "tp") -> None:
    """Whether engine ``name`` runs this model (bad input otherwise, exit 2: an architecture this engine does
    not support yet)."""
    if cfg.architecture in NOT_YET.get(name, ()):
        raise ModelError(f"engine {name!r} does not run {cfg.architecture} yet; use --engine core")
    if name not in MOE_PARALLEL_ENGINES and moe_parallel != "tp":
        raise ModelError(f"--moe-parallel {moe_parallel} is an option of the {' and '.join(MOE_PARALLEL_ENGINES)} "
                         f"engines only")


def available() -> Dict[str, object]:
    """name -> engine module (or entry point to one). An engine has ``logprobs(model_dir, prompts, tp,
    sequence_parallel, dtype, deterministic=False) -> [Tensor]``; the megatron engine also has ``train(args) -> int``;
    an engine may offer ``reusing()``, a context inside which ``logprobs`` keeps what it started for the next call
    with the same checkpoint (``verify`` runs its rows inside it)."""
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


def read_prompts(path: str, cfg: ModelConfig) -> List[List[int]]:
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such prompts file")
    try:
        with open(path, "rb") as f:
            prompts = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: not UTF-8 text (byte {err.start}); expected a JSON list of lists of token ids") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: not valid JSON ({err.msg}); expected a list of lists of token ids") from None
    check_prompts(prompts, cfg.vocab_size)
    cfg.check_prompt_lengths(prompts)
    return prompts


def check_prompts(prompts, vocab_size: int) -> None:
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) for p in prompts):
        raise ModelError("prompts must be a non-empty JSON list of lists of token ids, e.g. [[1, 2, 3], [7]]")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ModelError(f"prompt {i} is empty: every prompt needs at least one token")
        for tok in prompt:
            if not isinstance(tok, int) or isinstance(tok, bool):
                raise ModelError(f"prompt {i}: {tok!r} is not a token id (integers only)")
            if not 0 <= tok < vocab_size:
                raise ModelError(f"prompt {i}: token id {tok} is outside the vocabulary [0, {vocab_size})")


def check_model(model_dir: str, tp: int, moe_parallel: str = "tp") -> ModelConfig:
    """The config, the tp split and the checkpoint's tensors (names, shapes, readable files), checked in
    this process before any rank or engine starts: one-line ModelError otherwise."""
    from sp_core.models import CausalLM
    from sp_core.models.checkpoint import check_checkpoint
    from sp_core.mpu.parallel_state import single_rank

    if not os.path.isdir(model_dir):
        raise ModelError(f"{model_dir}: no such checkpoint directory")
    cfg = ModelConfig.from_pretrained(model_dir, moe_parallel)
    cfg.check_tp(tp)
    with single_rank(), torch.device("meta"):
        model = CausalLM(cfg)
    check_checkpoint(model, model_dir)
    return cfg


def check_finite(logprobs: List[torch.Tensor], what: str = "log-probabilities") -> None:
    """NaN or inf in an engine's output is an error, never a result."""
    for i, lp in enumerate(logprobs):
        if not torch.isfinite(lp).all():
            raise NonFiniteError(f"the {what} of prompt {i} contain NaN or inf (weights with NaN/inf, or an "
                                 f"overflow in this dtype)")
