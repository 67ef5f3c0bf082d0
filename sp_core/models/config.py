"""The model config, normalised from a Hugging Face ``config.json``."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional


class ModelError(ValueError):
    """Bad model input (checkpoint, architecture, shapes): reported as one line, exit 2 from the CLI."""


SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    hf: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, hf: dict) -> "ModelConfig":
        if not isinstance(hf, dict):
            raise ModelError(f"config.json holds a JSON {type(hf).__name__}, not an object; expected a Hugging Face "
                             f"model config")
        archs = hf.get("architectures")
        if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
            raise ModelError(f"config.json: \"architectures\" must be a list of names, e.g. [\"Qwen3ForCausalLM\"], "
                             f"got {archs!r}")
        _check_types(hf)
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if hf.get("use_sliding_window"):
            raise ModelError("use_sliding_window=true is not supported; supported: full causal attention")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ModelError(f"config.json: rope_theta must be a positive number, got {theta!r}")
        heads = hf["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            hf=hf,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ModelError(f"{model_dir}: no config.json; expected a Hugging Face checkpoint directory")
        try:
            with open(path, "rb") as f:
                hf = json.loads(f.read().decode("utf-8"))
        except UnicodeDecodeError:
            raise ModelError(f"{path}: not UTF-8 text; expected a Hugging Face config.json") from None
        except json.JSONDecodeError as err:
            raise ModelError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); expected a Hugging Face "
                             f"config.json") from None
        try:
            return cls.from_dict(hf)
        except ModelError as err:
            raise ModelError(str(err).replace("config.json", path, 1)) from None

    def check_prompt_lengths(self, prompts) -> None:
        """Every engine's limit on prompt length: the last position predicts one more token, and that
        position must fit the model's context (max_position_embeddings)."""
        limit = self.max_position_embeddings - 1
        for i, prompt in enumerate(prompts):
            if len(prompt) > limit:
                raise ModelError(f"prompt {i} has {len(prompt)} tokens; at most {limit} fit this model's context "
                                 f"(max_position_embeddings {self.max_position_embeddings}, one position for the "
                                 f"predicted token)")

    def check_tp(self, tp: int) -> None:
        """One-line errors for a tp size this model cannot be split by."""
        if self.num_attention_heads % tp:
            raise ModelError(f"tp {tp} does not divide num_attention_heads ({self.num_attention_heads})")
        kv = self.num_key_value_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise ModelError(f"tp {tp} and num_key_value_heads ({kv}) do not divide one another")
        if self.intermediate_size % tp:
            raise ModelError(f"tp {tp} does not divide intermediate_size ({self.intermediate_size})")



_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_NUMBERS = ("rms_norm_eps", "rope_theta")


def _check_types(hf: dict) -> None:
    """One line naming the first key that is missing or of the wrong type."""
    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    for key in _REQUIRED_INTS:
        if key not in hf:
            raise ModelError(f"config.json: missing \"{key}\" (a positive integer)")
        if not positive_int(hf[key]):
            raise ModelError(f"config.json: \"{key}\" must be a positive integer, got {hf[key]!r}")
    for key in _OPTIONAL_INTS:
        if hf.get(key) is not None and not positive_int(hf[key]):
            raise ModelError(f"config.json: \"{key}\" must be a positive integer, got {hf[key]!r}")
    for key in _OPTIONAL_NUMBERS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or value == float("inf")):
            raise ModelError(f"config.json: \"{key}\" must be a positive number, got {value!r}")
    for key in ("tie_word_embeddings", "attention_bias", "use_sliding_window"):
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            raise ModelError(f"config.json: \"{key}\" must be true or false, got {hf[key]!r}")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ModelError(f"config.json: \"{key}\" must be an object or null, got {hf[key]!r}")
    if hf.get("head_dim") is None and hf["hidden_size"] % hf["num_attention_heads"]:
        raise ModelError(f"config.json: hidden_size ({hf['hidden_size']}) is not a multiple of num_attention_heads "
                         f"({hf['num_attention_heads']}) and there is no head_dim")
