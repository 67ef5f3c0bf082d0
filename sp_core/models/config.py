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
        arch = (hf.get("architectures") or [None])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if hf.get("use_sliding_window"):
            raise ModelError("use_sliding_window=true is not supported; supported: full causal attention")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
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
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def check_tp(self, tp: int) -> None:
        """One-line errors for a tp size this model cannot be split by."""
        if self.num_attention_heads % tp:
            raise ModelError(f"tp {tp} does not divide num_attention_heads ({self.num_attention_heads})")
        kv = self.num_key_value_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise ModelError(f"tp {tp} and num_key_value_heads ({kv}) do not divide one another")
        if self.intermediate_size % tp:
            raise ModelError(f"tp {tp} does not divide intermediate_size ({self.intermediate_size})")
