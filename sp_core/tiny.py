"""Embedded tiny checkpoints, made by transformers itself from a config, with the awkward shapes that
make a wrong mapping show: vocabularies not divisible by t, fewer KV heads than t, head_dim != hidden /
heads, tied embeddings, norms perturbed away from 1, a large initializer range."""
from __future__ import annotations

import torch

TINY = {
    # vocab not divisible by 2 or 4, fewer KV heads than t = 4, tied embeddings, qkv bias (Qwen2)
    "qwen2": dict(arch="Qwen2ForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # head_dim != hidden / heads, a single KV head, untied, q/k norm (Qwen3)
    "qwen3": dict(arch="Qwen3ForCausalLM", vocab_size=101, hidden_size=48, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=20,
                  tie_word_embeddings=False),
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
}

# A ragged batch with a 1-token prompt; with 11 tokens over t = 4 the last rank holds padding.
PROMPTS = [[1, 5, 9, 3, 4], [7], [2, 8, 60, 11, 13]]


def hf_config(name: str, **overrides):
    from transformers import Qwen2Config, Qwen3Config

    spec = dict(TINY[name], **overrides)
    arch = spec.pop("arch")
    cls = Qwen2Config if arch == "Qwen2ForCausalLM" else Qwen3Config
    return cls(architectures=[arch], initializer_range=0.2, rms_norm_eps=1e-6, max_position_embeddings=256,
               rope_theta=10000.0, **spec)


def make_checkpoint(name: str, out_dir: str, seed: int = 0, **overrides) -> str:
    """Write the tiny checkpoint ``name`` to ``out_dir`` (float32 safetensors) and return the directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.add_(torch.randn_like(param) * 0.3)
            if pname.endswith(".bias"):
                param.normal_(0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def reference_logprobs(model_dir: str, prompts):
    """transformers' own float32 log-probabilities, one [len, vocab] tensor per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1) for p in prompts]
