"""The model config, normalised from a Hugging Face ``config.json``."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Tuple

from sp_core.models.errors import ModelError, NonFiniteError  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from sp_core.models.fp8 import FP8Format


DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM")
QWEN_MOE_ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM") + QWEN_MOE_ARCHITECTURES + DEEPSEEK_ARCHITECTURES
MOE_PARALLEL_MODES = ("tp", "ep")


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention. ``q_lora_rank`` None: a plain ``q_proj`` (V2-Lite)."""

    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # rope on interleaved pairs (x0, x1), (x2, x3), ... (V2 always; V3 by default)
    attention_bias: bool  # biases on q_a_proj, kv_a_proj_with_mqa and o_proj
    softmax_scale: float  # qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        """Values per token that MLA gathers under SP: [q_lat | kv_lat | k_pe]."""
        return (self.q_lora_rank or 0) + self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class IndexerConfig:
    """DeepSeek-V3.2's DSA lightning indexer: per query, the ``index_topk`` keys MLA may attend to."""

    index_topk: int
    index_n_heads: int
    index_head_dim: int  # its first qk_rope_head_dim dims are roped (half-split), the rest are not


@dataclass(frozen=True)
class MoEConfig:
    """The mixture of experts of DeepSeek (the layers from ``first_k_dense_replace`` on) and of Qwen2-MoE /
    Qwen3-MoE (the layers ``decoder_sparse_step`` and ``mlp_only_layers`` pick; softmax routing; Qwen2-MoE: one
    gated shared expert of its own width, Qwen3-MoE: none)."""

    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    # "greedy" | "group_limited_greedy" (V2: softmax scores, group max) | "noaux_tc" (V3: sigmoid scores,
    # e_score_correction_bias for selection only, groups ranked by the sum of their top-2) | "softmax" (Qwen:
    # softmax top-k, renormalised if norm_topk_prob)
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # Qwen2-MoE: the shared expert's width (shared_expert_intermediate_size) and its sigmoid gate
    shared_expert_intermediate_size: Optional[int] = None
    shared_expert_gate: bool = False

    @property
    def shared_size(self) -> int:
        """The shared experts' total intermediate size (0: none)."""
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.moe_intermediate_size * self.n_shared_experts


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


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
    # DeepSeek only (moe, mlp_layer_types: also the MoE Qwens)
    mla: Optional[MLAConfig] = None
    moe: Optional[MoEConfig] = None
    mlp_layer_types: Tuple[str, ...] = ()  # per layer: "dense" or "sparse" (MoE)
    indexer: Optional[IndexerConfig] = None  # DeepSeek-V3.2 (DSA) only
    # How MoE layers split their experts over the TP group (the one switch for it; a run setting, not
    # part of config.json): "tp" = every rank holds 1/t of every expert (g on the hidden state, g-bar on
    # the output); "ep" = expert parallelism, every rank holds n_routed_experts/t whole experts and
    # tokens travel to their experts by all-to-all. CLI: --moe-parallel.
    moe_parallel: str = "tp"
    # FP8 checkpoint (quantization_config quant_method fp8): the block size of its weight scales
    # (sp_core.models.fp8.FP8Format); None: unquantised. The model itself is never quantised: the weights are
    # dequantised to its dtype as they load.
    fp8: Optional[FP8Format] = None

    @classmethod
    def from_dict(cls, hf: dict, moe_parallel: str = "tp") -> "ModelConfig":
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
        from sp_core.models.fp8 import fp8_format

        fp8 = fp8_format(hf)  # FP8 weights are dequantised at load; any other quantisation is refused
        if moe_parallel not in MOE_PARALLEL_MODES:
            raise ModelError(f"moe_parallel {moe_parallel!r} is not a mode; supported: {', '.join(MOE_PARALLEL_MODES)}")
        # transformers 5 writes rope_parameters (rope_theta inside); older configs rope_theta + rope_scaling
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ModelError(f"config.json: rope_theta must be a positive number, got {theta!r}")
        rope_scaling = _checked_rope_scaling(hf, rope)
        heads = hf["num_attention_heads"]
        deepseek = _deepseek_fields(hf, rope_scaling) if arch in DEEPSEEK_ARCHITECTURES else {}
        if arch in QWEN_MOE_ARCHITECTURES:
            deepseek = _qwen_moe_fields(hf)
        fields = dict(
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
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # transformers' Qwen2MoeConfig: qkv_bias (default true) instead of attention_bias
            qkv_bias=(arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False))
                      or (arch == "Qwen2MoeForCausalLM" and hf.get("qkv_bias", True) is not False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            hf=hf,
            moe_parallel=moe_parallel,
            fp8=fp8,
        )
        fields.update(deepseek)
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, model_dir: str, moe_parallel: str = "tp") -> "ModelConfig":
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
            return cls.from_dict(hf, moe_parallel)
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

    def check_tp(self, tp: int, moe_flag: str = "--moe-parallel") -> None:
        """One-line errors for a tp size this model cannot be split by (and for expert parallelism asked of a
        model without MoE layers, which every command refuses alike); ``moe_flag``: the flag that set the MoE mode."""
        if self.moe_parallel == "ep" and self.moe is None:
            raise ModelError(f"{moe_flag} ep: {self.architecture} here has no MoE layers; use {moe_flag} tp "
                             f"(the default) for a dense model")
        if self.num_attention_heads % tp:
            raise ModelError(f"tp {tp} does not divide num_attention_heads ({self.num_attention_heads})")
        kv = self.num_key_value_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise ModelError(f"tp {tp} and num_key_value_heads ({kv}) do not divide one another")
        if "dense" in self.layer_types and self.intermediate_size % tp:
            raise ModelError(f"tp {tp} does not divide intermediate_size ({self.intermediate_size})")
        if self.moe is not None and "sparse" in self.layer_types:
            self._check_moe_tp(tp, moe_flag)

    def _check_moe_tp(self, tp: int, moe_flag: str) -> None:
        moe = self.moe
        if self.moe_parallel == "ep" and moe.n_routed_experts % tp:
            works = (f"use {moe_flag} tp (experts split by intermediate size)"
                     if moe.moe_intermediate_size % tp == 0 else "use a tp that divides it")
            raise ModelError(f"{moe_flag} ep: tp {tp} does not divide n_routed_experts ({moe.n_routed_experts}) "
                             f"(expert parallelism places whole experts on ranks); {works}")
        if self.moe_parallel == "tp" and moe.moe_intermediate_size % tp:
            works = (f"use {moe_flag} ep (whole experts per rank)"
                     if moe.n_routed_experts % tp == 0 else "use a tp that divides it")
            raise ModelError(f"{moe_flag} tp: tp {tp} does not divide moe_intermediate_size "
                             f"({moe.moe_intermediate_size}); {works}")
        shared = moe.shared_size
        if shared % tp:
            raise ModelError(f"tp {tp} does not divide the shared experts' intermediate size ({shared})")

    @property
    def layer_types(self) -> Tuple[str, ...]:
        """Per decoder layer: "dense" (MLP) or "sparse" (MoE)."""
        return self.mlp_layer_types or ("dense",) * self.num_hidden_layers


_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_NUMBERS = ("rms_norm_eps", "rope_theta")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


def _refuse_wrong(hf: dict, keys, ok, what: str) -> None:
    """One line naming the first of ``keys`` set (not null) in ``hf`` whose value fails ``ok``."""
    for key in keys:
        if hf.get(key) is not None and not ok(hf[key]):
            raise ModelError(f"config.json: \"{key}\" must be {what}, got {hf[key]!r}")


def _check_types(hf: dict) -> None:
    """One line naming the first key that is missing or of the wrong type."""
    for key in _REQUIRED_INTS:
        if key not in hf:
            raise ModelError(f"config.json: missing \"{key}\" (a positive integer)")
        _refuse_wrong(hf, (key,), _positive_int, "a positive integer")
    _refuse_wrong(hf, _OPTIONAL_INTS, _positive_int, "a positive integer")
    _refuse_wrong(hf, _OPTIONAL_NUMBERS, _positive_number, "a positive number")
    _refuse_wrong(hf, ("tie_word_embeddings", "attention_bias", "use_sliding_window"),
                  lambda v: isinstance(v, bool), "true or false")
    _refuse_wrong(hf, ("rope_scaling", "rope_parameters"), lambda v: isinstance(v, dict), "an object or null")
    if hf.get("head_dim") is None and hf["hidden_size"] % hf["num_attention_heads"]:
        raise ModelError(f"config.json: hidden_size ({hf['hidden_size']}) is not a multiple of num_attention_heads "
                         f"({hf['num_attention_heads']}) and there is no head_dim")


# The keys each rope type of sp_core.layers.rotary reads, by what each must be when present ("factor" is
# required, as transformers requires it; YaRN may derive it): {rope type: {key: (ok, what)}}
_FACTOR = {"factor": (_positive_number, "a positive number")}
_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number")
_ROPE_KEYS = {
    "default": {},
    "linear": _FACTOR,
    "dynamic": _FACTOR,
    "yarn": dict(_FACTOR, original_max_position_embeddings=(_positive_int, "a positive integer"),
                 attention_factor=(_positive_number, "a positive number"), beta_fast=_NUMBER, beta_slow=_NUMBER,
                 mscale=_NUMBER, mscale_all_dim=_NUMBER, truncate=(lambda v: isinstance(v, bool), "true or false")),
}


def _checked_rope_scaling(hf: dict, rope: dict) -> Optional[dict]:
    """The rope scaling dict (None for plain RoPE) of ``rope`` (config.json's rope_parameters or rope_scaling,
    rope_theta removed), with one line naming a rope type that is not supported, or the first key its type
    reads that is of the wrong type or missing."""
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in _ROPE_KEYS:
        raise ModelError(f"config.json: {where} rope_type {rope_type!r} is not supported; supported: "
                         f"{', '.join(_ROPE_KEYS)}")
    if rope_type == "default":
        return None
    for key, (ok, what) in _ROPE_KEYS[rope_type].items():
        if rope.get(key) is not None and not ok(rope[key]):
            raise ModelError(f"config.json: {where} \"{key}\" must be {what} for rope_type {rope_type!r}, "
                             f"got {rope[key]!r}")
    needs = '"factor" (a positive number)'
    if rope_type == "yarn":  # as transformers: the original context defaults to max_position_embeddings, and
        # DeepSeek-V3-style configs may leave the factor to max / original context
        longest = hf.get("max_position_embeddings", 32768)
        if rope.get("original_max_position_embeddings") is None:
            rope["original_max_position_embeddings"] = longest
        elif rope.get("factor") is None:
            rope["factor"] = longest / rope["original_max_position_embeddings"]
        needs += ' or "original_max_position_embeddings" (a positive integer; factor = max_position_embeddings / it)'
    if rope.get("factor") is None:
        raise ModelError(f"config.json: {where} of rope_type {rope_type!r} has no \"factor\"; {rope_type} needs {needs}")
    return rope


# DeepSeek's own keys, by what each must be when present (null: the architecture's default; q_lora_rank null:
# V2-Lite's plain q_proj)
_DEEPSEEK_POSITIVE_INTS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                           "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                           "topk_group", "moe_layer_freq")  # the indexer's keys: _indexer_fields
_DEEPSEEK_COUNTS = ("first_k_dense_replace", "n_shared_experts")  # 0 allowed
_DEEPSEEK_FLAGS = ("norm_topk_prob", "rope_interleave", "mlp_bias")


def _check_deepseek_types(hf: dict) -> None:
    """One line naming the first DeepSeek key of the wrong type or range (as _check_types does for the rest)."""
    _refuse_wrong(hf, _DEEPSEEK_POSITIVE_INTS, _positive_int, "a positive integer or null")
    _refuse_wrong(hf, _DEEPSEEK_COUNTS, _non_negative_int, "a non-negative integer or null")
    _refuse_wrong(hf, _DEEPSEEK_FLAGS, lambda v: isinstance(v, bool), "true or false")
    _refuse_wrong(hf, ("routed_scaling_factor",), _positive_number, "a positive number")
    _refuse_wrong(hf, ("topk_method",), lambda v: isinstance(v, str), "a name")


def _deepseek_fields(hf: dict, rope_scaling: Optional[dict]) -> dict:
    """MLA, MoE, layer types and (V3.2) the DSA indexer of a DeepSeek V2 / V3 / V3.2 config.json, with
    one-line errors for what the math cannot take (the fields and defaults of transformers'
    DeepseekV2Config / DeepseekV3Config / DeepseekV32Config)."""
    _check_deepseek_types(hf)
    arch = hf["architectures"][0]
    v32 = arch == "DeepseekV32ForCausalLM"
    v3 = arch == "DeepseekV3ForCausalLM" or v32  # V3.2 = V3's MLA and MoE plus the indexer
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise ModelError(f"num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}) for "
                         f"multi-head latent attention (every head has its own key, expanded from the latent)")
    if hf.get("mlp_bias"):
        raise ModelError("mlp_bias=true is not supported; supported: MLPs and experts without bias")
    nope, rope_dim = hf.get("qk_nope_head_dim", 128), hf.get("qk_rope_head_dim", 64)
    scale = (nope + rope_dim) ** -0.5
    if rope_scaling is not None and rope_scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2
    mla = MLAConfig(
        q_lora_rank=hf.get("q_lora_rank", 1536), kv_lora_rank=hf.get("kv_lora_rank", 512),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=hf.get("v_head_dim", 128),
        # transformers' V3.2 has no rope_interleave field: its MLA always ropes interleaved pairs
        rope_interleave=bool(hf.get("rope_interleave", True)) if v3 and not v32 else True,
        attention_bias=bool(hf.get("attention_bias", False)), softmax_scale=scale)

    layers = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace", 3 if v3 else 0) or 0
    types = ["dense"] * min(first_dense, layers) + ["sparse"] * max(layers - first_dense, 0)
    listed = hf.get("mlp_layer_types")
    if v32 and listed is not None:  # V3.2 saves mlp_layer_types, and transformers' V3.2 follows it
        if len(listed) != layers or not set(listed) <= {"dense", "sparse"}:
            raise ModelError(f"mlp_layer_types must list \"dense\" or \"sparse\" for each of the {layers} layers; "
                             f"got {listed}")
        types = list(listed)
    elif listed is not None and list(listed) != types:
        # transformers' V2 / V3 classes place MoE layers by first_k_dense_replace alone: a config.json
        # whose list disagrees is ambiguous
        raise ModelError(f"mlp_layer_types {listed} disagrees with first_k_dense_replace ({first_dense}), which "
                         f"{arch} uses: make them agree")
    fields = dict(mla=mla, mlp_layer_types=tuple(types), head_dim=nope + rope_dim, num_key_value_heads=heads,
                  qkv_bias=False)
    if v32:
        fields["indexer"] = _indexer_fields(hf, mla)
    if "sparse" not in types:
        return fields

    experts = hf.get("n_routed_experts", 256 if v3 else 64)
    top_k = hf.get("num_experts_per_tok", 8 if v3 else None)
    if top_k is None:
        raise ModelError("num_experts_per_tok is missing from config.json; MoE layers need the number of experts "
                         "each token is routed to (e.g. 6 for DeepSeek-V2, 8 for DeepSeek-V3)")
    if v3:  # transformers' V3 has no topk_method / scoring_func: always noaux_tc
        method = "noaux_tc"
        n_group, topk_group = hf.get("n_group", 8), hf.get("topk_group", 4)
    else:
        method = hf.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ModelError(f"topk_method {method!r} is not supported for DeepseekV2ForCausalLM; "
                             f"supported: greedy, group_limited_greedy")
        n_group, topk_group = (hf.get("n_group"), hf.get("topk_group")) if method != "greedy" else (1, 1)
    if n_group is None or topk_group is None or n_group < 1 or experts % n_group:
        raise ModelError(f"n_group ({n_group}) must divide n_routed_experts ({experts}) for grouped routing")
    if not 1 <= topk_group <= n_group:
        raise ModelError(f"topk_group ({topk_group}) must lie in [1, n_group = {n_group}]")
    if v3 and experts // n_group < 2:
        raise ModelError(f"DeepSeek-V3 routing ranks each group by the sum of its top-2 experts: needs >= 2 "
                         f"experts per group; got {experts} experts in {n_group} groups")
    if not 1 <= top_k <= experts // n_group * topk_group:
        raise ModelError(f"num_experts_per_tok ({top_k}) must lie in [1, {experts // n_group * topk_group}] "
                         f"(the experts of the topk_group selected groups)")
    fields["moe"] = MoEConfig(
        n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=hf.get("n_shared_experts", 1 if v3 else 2),
        moe_intermediate_size=hf.get("moe_intermediate_size", 2048 if v3 else 1407), topk_method=method, n_group=n_group, topk_group=topk_group,
        # transformers' V2 router ignores norm_topk_prob (it never renormalises the top-k weights); V3 honours it
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)) if v3 else False,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5 if v3 else 1.0)))
    return fields


# Qwen-MoE's own keys, by what each must be when present (null: transformers' default)
_QWEN_MOE_POSITIVE_INTS = ("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                           "shared_expert_intermediate_size")
_QWEN_MOE_DEFAULTS = {  # transformers' Qwen2MoeConfig / Qwen3MoeConfig
    "Qwen2MoeForCausalLM": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                shared_expert_intermediate_size=5632),
    "Qwen3MoeForCausalLM": dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}


def _qwen_moe_fields(hf: dict) -> dict:
    """MoE config and layer types of a Qwen2-MoE / Qwen3-MoE config.json: layer i is MoE when it is not in
    ``mlp_only_layers``, ``num_experts`` > 0 and ``decoder_sparse_step`` divides i + 1 (as transformers'
    decoder layer decides), a dense SwiGLU MLP of ``intermediate_size`` otherwise."""
    _refuse_wrong(hf, _QWEN_MOE_POSITIVE_INTS, _positive_int, "a positive integer or null")
    # published checkpoints write num_experts; transformers 5 saves it as num_local_experts (its attribute map)
    _refuse_wrong(hf, ("num_experts", "num_local_experts"), _non_negative_int, "a non-negative integer or null")
    if None not in (hf.get("num_experts"), hf.get("num_local_experts")) and hf["num_experts"] != hf["num_local_experts"]:
        raise ModelError(f"config.json: num_experts ({hf['num_experts']}) and num_local_experts "
                         f"({hf['num_local_experts']}) disagree; they name the same number")
    _refuse_wrong(hf, ("norm_topk_prob", "qkv_bias"), lambda v: isinstance(v, bool), "true or false")
    layers = hf["num_hidden_layers"]
    _refuse_wrong(hf, ("mlp_only_layers",),
                  lambda v: isinstance(v, list) and all(_non_negative_int(i) and i < layers for i in v),
                  f"a list of layer indices in [0, {layers})")
    defaults = _QWEN_MOE_DEFAULTS[hf["architectures"][0]]

    def get(key):
        return defaults[key] if hf.get(key) is None else hf[key]

    experts = get("num_experts") if hf.get("num_local_experts") is None else hf["num_local_experts"]
    step, dense_only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    types = tuple("sparse" if i not in dense_only and experts > 0 and (i + 1) % step == 0 else "dense"
                  for i in range(layers))
    fields = dict(mlp_layer_types=types)
    if "sparse" not in types:
        return fields
    top_k = get("num_experts_per_tok")
    if top_k > experts:
        raise ModelError(f"num_experts_per_tok ({top_k}) must lie in [1, num_experts = {experts}]")
    fields["moe"] = MoEConfig(
        n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=0,
        moe_intermediate_size=get("moe_intermediate_size"), topk_method="softmax", n_group=1, topk_group=1,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), routed_scaling_factor=1.0)
    if "shared_expert_intermediate_size" in defaults:  # Qwen2-MoE: one shared expert, sigmoid-gated
        fields["moe"] = dataclasses.replace(fields["moe"], shared_expert_intermediate_size=get(
            "shared_expert_intermediate_size"), shared_expert_gate=True)
    return fields


def _indexer_fields(hf: dict, mla: MLAConfig) -> IndexerConfig:
    """DeepSeek-V3.2's indexer fields (defaults: transformers' DeepseekV32Config)."""
    if mla.q_lora_rank is None:
        raise ModelError("q_lora_rank: null is not supported for DeepseekV32ForCausalLM: the DSA indexer's queries "
                         "come from the q latent; set q_lora_rank (1536 for DeepSeek-V3.2)")
    indexer = IndexerConfig(index_topk=hf.get("index_topk", 2048), index_n_heads=hf.get("index_n_heads", 64),
                            index_head_dim=hf.get("index_head_dim", 128))
    for name, value in vars(indexer).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"{name} must be a positive integer, got {value!r}")
    if indexer.index_head_dim < mla.qk_rope_head_dim:
        raise ModelError(f"index_head_dim ({indexer.index_head_dim}) must be >= qk_rope_head_dim "
                         f"({mla.qk_rope_head_dim}): the indexer ropes the first qk_rope_head_dim dims of its "
                         f"queries and keys")
    return indexer
