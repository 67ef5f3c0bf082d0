"""Embedded tiny checkpoints, made by transformers itself from a config, with the awkward shapes that
make a wrong mapping show: vocabularies not divisible by t, fewer KV heads than t, head_dim != hidden /
heads, tied embeddings, norms perturbed away from 1, a large initializer range; for DeepSeek also
v_head_dim != qk_nope_head_dim, YaRN with mscale != mscale_all_dim, a non-zero e_score_correction_bias,
a dense layer before an MoE layer; for V3.2 an index_topk shorter than the prompts; for FP8, V3 in the published
block-FP8 format with a small block that no quantised dimension is a multiple of."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile

import torch

# MLA with v_head_dim (12) != qk_nope_head_dim (16); layer 0 dense, layer 1 MoE: 8 experts (t = 2, 4 hold
# whole experts in expert-parallel mode), moe_intermediate_size divisible by 4.
_DEEPSEEK = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                 moe_intermediate_size=16, n_routed_experts=8, first_k_dense_replace=1, tie_word_embeddings=False)

TINY = {
    # vocab not divisible by 2 or 4, fewer KV heads than t = 4, tied embeddings, qkv bias (Qwen2)
    "qwen2": dict(arch="Qwen2ForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # head_dim != hidden / heads, a single KV head, untied, q/k norm (Qwen3)
    "qwen3": dict(arch="Qwen3ForCausalLM", vocab_size=101, hidden_size=48, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=20,
                  tie_word_embeddings=False),
    # Qwen3-MoE: Qwen3's awkward attention shapes (vocab not divisible by 2 or 4, one KV head, head_dim !=
    # hidden / heads); layers sparse, dense (mlp_only_layers), sparse; 8 experts (t = 2, 4 hold whole experts
    # in expert-parallel mode), moe_intermediate_size divisible by 4, renormalised top-3 routing
    "qwen3-moe": dict(arch="Qwen3MoeForCausalLM", vocab_size=101, hidden_size=48, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=20,
                      num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False),
    # Qwen2-MoE: Qwen2's attention (qkv bias, vocab not divisible by 2 or 4, fewer KV heads than t = 4, tied
    # embeddings); layers dense (mlp_only_layers), sparse, sparse; 8 experts top-2 (not renormalised, as
    # Qwen1.5-MoE), a sigmoid-gated shared expert of its own width (24: divisible by 4, != 16)
    "qwen2-moe": dict(arch="Qwen2MoeForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0], tie_word_embeddings=True),
    # trainable at t = 4 (whole KV heads per rank)
    "qwen3-train": dict(arch="Qwen3ForCausalLM", vocab_size=90, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=12,
                        tie_word_embeddings=False),
    "qwen2-train": dict(arch="Qwen2ForCausalLM", vocab_size=90, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        tie_word_embeddings=True),
    # t = 8: heads divisible by 8, fewer KV heads than t for inference, vocab not divisible by 8
    "qwen3-tp8": dict(arch="Qwen3ForCausalLM", vocab_size=83, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=False),
    "qwen2-tp8-train": dict(arch="Qwen2ForCausalLM", vocab_size=83, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                            tie_word_embeddings=True),
    # V2: softmax routing limited to the best 2 of 4 groups (group max), 2 shared experts, YaRN given in
    # the legacy config.json form (rope_theta + rope_scaling, as DeepSeek-V2's own config.json)
    "deepseek-v2": dict(arch="DeepseekV2ForCausalLM", **_DEEPSEEK, q_lora_rank=24, n_shared_experts=2,
                        num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        routed_scaling_factor=1.5, legacy_rope_json=True,
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=64, mscale=0.707,
                                             mscale_all_dim=0.707, beta_fast=32, beta_slow=1)),
    # V2-Lite: no q_lora (a plain q_proj), greedy softmax routing, attention biases
    "deepseek-v2-lite": dict(arch="DeepseekV2ForCausalLM", **_DEEPSEEK, q_lora_rank=None, n_shared_experts=1,
                             num_experts_per_tok=2, topk_method="greedy", attention_bias=True),
    # V3: sigmoid + e_score_correction_bias routing, groups ranked by their top-2 sum, renormalised weights,
    # YaRN with mscale != mscale_all_dim (both the cos / sin factor and the softmax scale differ from 1)
    "deepseek-v3": dict(arch="DeepseekV3ForCausalLM", **_DEEPSEEK, q_lora_rank=24, n_shared_experts=1,
                        num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5,
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                             original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5,
                                             beta_fast=32, beta_slow=1)),
    # V3.2: V3 plus the DSA indexer, index_topk (3) shorter than the prompts (sparse attention from position
    # 3 on), index_head_dim (16) > qk_rope_head_dim (8): roped and unroped indexer dims
    "deepseek-v32": dict(arch="DeepseekV32ForCausalLM", **_DEEPSEEK, q_lora_rank=24, n_shared_experts=1,
                         num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                         routed_scaling_factor=2.5, index_topk=3, index_n_heads=8, index_head_dim=16,
                         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                              original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5,
                                              beta_fast=32, beta_slow=1)),
    # V3 in the published block-FP8 format (``fp8_block``: quantised by ``_quantise_fp8``), with no quantised
    # dimension a multiple of the block (hidden 72, intermediate 88, moe_intermediate 20, kv_lora 20, q_lora 24):
    # the edge blocks are partial and every rank's shard at t = 2, 4 starts inside a block
    "deepseek-v3-fp8": dict(arch="DeepseekV3ForCausalLM", **dict(_DEEPSEEK, hidden_size=72, intermediate_size=88,
                                                                 moe_intermediate_size=20, kv_lora_rank=20),
                            q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                            norm_topk_prob=True, routed_scaling_factor=2.5, fp8_block=[16, 16],
                            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                 original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5,
                                                 beta_fast=32, beta_slow=1)),
    # t = 8: V3 and V3.2 with heads divisible by 8 (expert parallelism holds one whole expert per rank)
    "deepseek-v3-tp8": dict(arch="DeepseekV3ForCausalLM", **dict(_DEEPSEEK, num_attention_heads=8, num_key_value_heads=8),
                            q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                            norm_topk_prob=True, routed_scaling_factor=2.5),
    "deepseek-v32-tp8": dict(arch="DeepseekV32ForCausalLM",
                             **dict(_DEEPSEEK, num_attention_heads=8, num_key_value_heads=8),
                             q_lora_rank=24, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                             norm_topk_prob=True, routed_scaling_factor=2.5, index_topk=3, index_n_heads=8,
                             index_head_dim=16),
}

DEEPSEEK_MODELS = ("deepseek-v2", "deepseek-v2-lite", "deepseek-v3")
DEEPSEEK_SPARSE_MODELS = ("deepseek-v32",)  # DSA: attention restricted to the indexer's top-k keys

# A ragged batch with a 1-token prompt; with 11 tokens over t = 4 the last rank holds padding.
PROMPTS = [[1, 5, 9, 3, 4], [7], [2, 8, 60, 11, 13]]


def hf_config(name: str, **overrides):
    import transformers

    spec = dict(TINY[name], **overrides)
    arch = spec.pop("arch")
    spec.pop("legacy_rope_json", None)
    spec.pop("fp8_block", None)
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    if "rope_parameters" not in spec:
        spec["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0)
    return cls(architectures=[arch], initializer_range=0.2, rms_norm_eps=1e-6, max_position_embeddings=256, **spec)


def _legacy_rope_json(out_dir: str) -> None:
    """Rewrite config.json's rope_parameters as the legacy rope_theta + rope_scaling keys."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        hf = json.load(f)
    rope = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    hf["rope_scaling"] = rope
    with open(path, "w") as f:
        json.dump(hf, f, indent=2)


def make_checkpoint(name: str, out_dir: str, seed: int = 0, **overrides) -> str:
    """Write the tiny checkpoint ``name`` to ``out_dir`` (float32 safetensors) and return the directory.
    ``fp8_block=[bn, bk]`` (an override, or the preset's): written in the published block-FP8 format."""
    from transformers import AutoModelForCausalLM

    fp8_block = overrides.pop("fp8_block", TINY[name].get("fp8_block"))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.add_(torch.randn_like(param) * 0.3)
            if pname.endswith(".bias"):
                param.normal_(0, 0.2)
        for bname, buffer in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    if TINY[name].get("legacy_rope_json"):
        _legacy_rope_json(out_dir)
    if fp8_block:
        _quantise_fp8(out_dir, fp8_block, seed)
    return out_dir


FP8_MAX = 448.0  # the largest float8_e4m3fn value


def _fp8_quantised(name: str, tensor: torch.Tensor) -> bool:
    """The weights DeepSeek-V3's published checkpoints store in FP8: the decoder layers' linear weights, not
    the embeddings, LM head, norms or the router (``mlp.gate``)."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2
            and "norm" not in name and not name.endswith("mlp.gate.weight"))


def _quantise_blocks(w: torch.Tensor, block, gen: torch.Generator):
    """(float8_e4m3fn values, float32 weight_scale_inv [ceil(N/bn), ceil(K/bk)]) of ``w`` [N, K]; each block is
    first multiplied by its own factor in [1/4, 4], so that neighbouring blocks' scales differ."""
    (n, k), (bn, bk) = w.shape, block
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    scale = torch.empty(-(-n // bn), -(-k // bk), dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].double() * 2.0 ** (4 * torch.rand((), generator=gen) - 2)
            scale[i, j] = part.abs().max().item() / FP8_MAX
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (part / scale[i, j].double()).to(torch.float8_e4m3fn)
    return q, scale


def _quantise_fp8(out_dir: str, block, seed: int) -> None:
    """Rewrite the checkpoint in ``out_dir`` in the published block-FP8 format: each quantised weight ``X.weight``
    float8_e4m3fn with its float32 ``X.weight_scale_inv`` per block, and config.json's quantization_config."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(out_dir, "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in load_file(path).items():
        if _fp8_quantised(name, w):
            tensors[name], tensors[name + "_scale_inv"] = _quantise_blocks(w, block, gen)
        else:
            tensors[name] = w
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        hf = json.load(f)
    hf["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                     weight_block_size=list(block))
    with open(config_path, "w") as f:
        json.dump(hf, f, indent=2)


def reference_logprobs(model_dir: str, prompts):
    """transformers' own float32 log-probabilities, one [len, vocab] tensor per prompt. An FP8 checkpoint
    (quantization_config quant_method fp8): transformers on its weights dequantised here (``_dequantised``),
    independently of the loaders under test (transformers' own FP8 loading needs accelerate)."""
    from transformers import AutoModelForCausalLM

    with _unquantised(model_dir) as plain_dir:
        model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1) for p in prompts]


@contextlib.contextmanager
def _unquantised(model_dir: str):
    """``model_dir`` itself, or for an FP8 checkpoint a temporary float32 copy: every FP8 weight times its
    scale, config.json without quantization_config."""
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    quant = hf.pop("quantization_config", None)
    if not quant:
        yield model_dir
        return
    from safetensors.torch import load_file, save_file

    tensors = {}
    for file in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        tensors.update(load_file(file))
    block = quant.get("weight_block_size")
    plain = {}
    for name, w in tensors.items():
        if name.endswith((".input_scale", "_scale_inv", "_scale")):
            continue
        scale = tensors.get(name + "_scale_inv", tensors.get(name + "_scale"))
        plain[name] = w if scale is None else _dequantised(w, scale, block)
    with tempfile.TemporaryDirectory(prefix="sp-core-reference-") as plain_dir:
        save_file(plain, os.path.join(plain_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(plain_dir, "config.json"), "w") as f:
            json.dump(hf, f)
        yield plain_dir


def _dequantised(w: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """float32 ``w`` x its scale: one per tensor, or each [bn, bk] block's (the grid repeated over the block,
    cut at the edges)."""
    if block is None:
        return (w.double() * scale.double().reshape(())).float()
    n, k = w.shape[-2:]
    grid = scale.double().repeat_interleave(block[0], -2)[..., :n, :].repeat_interleave(block[1], -1)[..., :k]
    return (w.double() * grid).float()
