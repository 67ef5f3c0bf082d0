"""Qwen3-MoE and Qwen2-MoE served by the real sglang.Engine through the adapter (CPU, float32), one engine
start per configuration:
  qwen3-moe  tp 2, --enable-layernorm-sp (SP_CORE_SP_MIN_TOKENS=0), --ep-size 2 (the core's expert
             parallelism), chunked prefill + mixed chunks, radix cache
  qwen2-moe  tp 2, --enable-layernorm-sp, experts split over TP, chunked prefill, radix cache
Each: prompt log-probabilities at every position vs transformers (<= 1e-4, ragged batch with a 1-token
prompt), greedy 8 tokens == transformers' generate, a radix-cache hit (extend over a cached prefix) vs
transformers (<= 1e-4); with --ep-size the MoE's all-to-alls ran on every worker.
"""
import importlib.util
import json
import os

import pytest
import torch

from sp_core.app.tiny import make_checkpoint
from support.serving import (assert_all_to_all_on_every_worker, generate, hf_greedy, prompt_logprobs_diff,
                             radix_hit_diff)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed"),
    pytest.mark.timeout(900),
]

NEW_TOKENS = 8
PROMPTS = [[1, 5, 9, 3, 4, 20, 30, 11, 2], [7], [2, 8, 60, 11, 13]]
PREFIX = [int(t) for t in torch.randint(0, 97, (21,), generator=torch.Generator().manual_seed(3))]
SUFFIX = [5, 17, 3, 88, 41, 9]

CONFIGS = {
    "qwen3-moe-tp2-sp-ep": ("qwen3-moe", 2, dict(enable_layernorm_sp=True, ep_size=2, chunked_prefill_size=16,
                                                 enable_mixed_chunk=True)),
    "qwen2-moe-tp2-sp": ("qwen2-moe", 2, dict(enable_layernorm_sp=True, chunked_prefill_size=16)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_qwen_moe_served_equals_transformers(config, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sp_core_sglang.cli_engine.engine import start_engine

    name, tp, engine_kwargs = CONFIGS[config]
    model_dir = make_checkpoint(name, str(tmp_path / name))
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collective_log = str(tmp_path / "collectives.log")
    expert_parallel = engine_kwargs.get("ep_size", 1) > 1
    if expert_parallel:
        monkeypatch.setenv("SP_CORE_COLLECTIVE_LOG", collective_log)
    engine = start_engine(model_dir, tp, adapter=True, sp_min_tokens=0, **engine_kwargs)
    try:
        _, diff = prompt_logprobs_diff(engine, hf_model, PROMPTS, vocab)
        print(f"{config}: prompt logprobs max |d| vs transformers {diff:.2e}")
        assert diff <= 1e-4
        if expert_parallel:
            assert_all_to_all_on_every_worker(collective_log, tp)

        outs = generate(engine, PROMPTS, sampling_params={"temperature": 0.0, "max_new_tokens": NEW_TOKENS,
                                                          "ignore_eos": True})
        for p, o in zip(PROMPTS, outs):
            assert o["output_ids"] == hf_greedy(hf_model, [p], NEW_TOKENS)[0], f"greedy tokens differ for prompt {p}"

        cached, diff = radix_hit_diff(engine, hf_model, PREFIX, SUFFIX, vocab)
        assert cached == len(PREFIX), cached
        print(f"{config}: radix-cache hit of {cached} tokens, max |d| vs transformers {diff:.2e}")
        assert diff <= 1e-4
    finally:
        engine.shutdown()
