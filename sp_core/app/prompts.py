"""Prompts: a prompts file read, and token ids checked against a model (on the host lists). Apart from
``engines`` so that ``runtime`` (the core on a rank), which checks prompts too, does not import the engine
registry that runs it."""
from __future__ import annotations

import json
import os
from typing import List

from sp_core.models import ModelConfig, ModelError


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
