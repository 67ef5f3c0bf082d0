"""DeepSeek V2 / V2-Lite / V3 / V3.2 served by the real sglang.Engine through the adapter (CPU, float32): MLA
in the absorbed form on sglang's MLA KV pool, SP for plain prefill, plain TP for decode.

One engine start per configuration covers its checks (engine starts dominate the time):
  V3       tp 2, --enable-layernorm-sp (SP_CORE_SP_MIN_TOKENS=0), chunked prefill + mixed chunks, radix cache
  V3.2     tp 2, --enable-layernorm-sp, --ep-size 2 (the core's expert parallelism), chunked prefill + mixed
           chunks; index_topk 3 < every prompt of 5+ tokens: sparse attention over cached index keys
  V2       tp 2, SP off
  V2-Lite  tp 1
Each: prompt log-probabilities at every position vs transformers (<= 1e-4, ragged batch with a 1-token
prompt), greedy 8 tokens == transformers' generate, a radix-cache hit (extend over a cached prefix, the
absorbed form against cached latent rows) vs transformers (<= 1e-4), and the KV pool each worker saw is
sglang's MLA pool with rows of kv_lora_rank + qk_rope_head_dim. V3 and V3.2 also: 8 concurrent requests of
mixed lengths == the same requests one at a time (tokens, and output log-probabilities within 1e-4).
V3.2's negative control: transformers with index_topk raised past the prompts (dense attention) is far from
what the engine returned, so the sparse selection is what matched.
"""
import importlib.util
import json
import os

import pytest
import torch

from sp_core.app.tiny import make_checkpoint
from support.serving import (assert_all_to_all_on_every_worker, generate, hf_greedy, hf_logprobs,
                             prompt_logprobs_diff, radix_hit_diff)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed"),
    pytest.mark.timeout(900),
]

NEW_TOKENS = 8
PROMPTS = [[1, 5, 9, 3, 4, 20, 30, 11, 2], [7], [2, 8, 60, 11, 13]]
PREFIX = [int(t) for t in torch.randint(0, 97, (21,), generator=torch.Generator().manual_seed(3))]
SUFFIX = [5, 17, 3, 88, 41, 9]
CONCURRENT = [[int(t) for t in torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))]
              for n in (5, 1, 30, 3, 23, 2, 17, 9)]

CONFIGS = {
    "deepseek-v3-tp2-sp": ("deepseek-v3", 2, dict(enable_layernorm_sp=True, chunked_prefill_size=16,
                                                  enable_mixed_chunk=True), True),
    "deepseek-v32-tp2-sp-ep": ("deepseek-v32", 2, dict(enable_layernorm_sp=True, ep_size=2, chunked_prefill_size=16,
                                                       enable_mixed_chunk=True), True),
    "deepseek-v2-tp2": ("deepseek-v2", 2, {}, False),
    "deepseek-v2-lite-tp1": ("deepseek-v2-lite", 1, {}, False),
}


def _hf_greedy(model, prompt):
    return hf_greedy(model, [prompt], NEW_TOKENS)[0]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_deepseek_served_equals_transformers(config, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sp_core_sglang.cli_engine.engine import start_engine
    from sp_core_sglang.models.deepseek import KV_POOL_LOG_ENV

    name, tp, engine_kwargs, concurrent = CONFIGS[config]
    model_dir = make_checkpoint(name, str(tmp_path / name))
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    vocab, row_width = hf["vocab_size"], hf["kv_lora_rank"] + hf["qk_rope_head_dim"]
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pool_log, collective_log = str(tmp_path / "kv_pool.log"), str(tmp_path / "collectives.log")
    monkeypatch.setenv(KV_POOL_LOG_ENV, pool_log)  # the workers inherit it at start
    expert_parallel = engine_kwargs.get("ep_size", 1) > 1
    if expert_parallel:
        monkeypatch.setenv("SP_CORE_COLLECTIVE_LOG", collective_log)
    engine = start_engine(model_dir, tp, adapter=True, sp_min_tokens=0, **engine_kwargs)
    try:
        # prompt log-probabilities at every position, ragged batch
        served, diff = prompt_logprobs_diff(engine, hf_model, PROMPTS, vocab)
        print(f"{config}: prompt logprobs max |d| vs transformers {diff:.2e}")
        assert diff <= 1e-4
        if "index_topk" in hf:  # negative control: the same weights with dense attention are far off
            dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, index_topk=64).eval()
            far = max((got - hf_logprobs(dense, p)).abs().max().item() for got, p in zip(served, PROMPTS))
            print(f"{config}: vs transformers with dense attention (index_topk 64) {far:.2e}")
            assert far > 1e-1
        if expert_parallel:
            assert_all_to_all_on_every_worker(collective_log, tp)

        # greedy decode (absorbed MLA over the cached latent rows, plain TP)
        outs = generate(engine, PROMPTS, sampling_params={"temperature": 0.0, "max_new_tokens": NEW_TOKENS,
                                                           "ignore_eos": True})
        for p, o in zip(PROMPTS, outs):
            assert o["output_ids"] == _hf_greedy(hf_model, p), f"greedy tokens differ for prompt {p}"

        # radix cache: the prefix first, then prefix + suffix extends over the cached prefix
        cached, diff = radix_hit_diff(engine, hf_model, PREFIX, SUFFIX, vocab)
        assert cached == len(PREFIX), cached
        print(f"{config}: radix-cache hit of {cached} tokens, max |d| vs transformers {diff:.2e}")
        assert diff <= 1e-4

        if concurrent:  # 8 at once (prefill and decode share batches) vs one at a time
            params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
            together = generate(engine, CONCURRENT, sampling_params=params, return_logprob=True)
            for p, o in zip(CONCURRENT, together):
                alone = generate(engine, [p], sampling_params=params, return_logprob=True)[0]
                assert o["output_ids"] == alone["output_ids"], f"prompt of {len(p)} tokens"
                got = torch.tensor([lp for lp, *_ in o["meta_info"]["output_token_logprobs"]])
                want = torch.tensor([lp for lp, *_ in alone["meta_info"]["output_token_logprobs"]])
                assert (got - want).abs().max().item() <= 1e-4
    finally:
        engine.shutdown()

    with open(pool_log) as f:
        pools = [line.split(" ", 2) for line in f.read().splitlines()]
    assert len({pid for pid, *_ in pools}) == tp, pools  # every TP worker checked its pool
    for _, cls, shape in pools:
        assert cls == "MLATokenToKVPool" and eval(shape)[1:] == (1, row_width), (cls, shape)


def _resolve(model_dir, extra):
    """In the engine host: sglang's own server-argument resolution with the adapter enabled; (error or None,
    the model config overrides and attention backend it resolved)."""
    from sglang.srt.arg_groups.model_override_base import resolved_view
    from sglang.srt.server_args import ServerArgs

    from sp_core_sglang import plugin
    from sp_core_sglang.cli_engine import cpu_env

    cpu_env.apply_cpu_engine_env(1)
    plugin.enable()
    args = ServerArgs(model_path=model_dir, device="cpu", attention_backend="torch_native", dtype="float32",
                      disable_cuda_graph=True, skip_tokenizer_init=True, grammar_backend="none", **extra)
    try:
        args.resolve_once()
    except ValueError as err:
        return str(err), None, None
    view = resolved_view(args)
    return None, view.json_model_override_args, view.attention_backend


@pytest.mark.parametrize("extra, flag", [
    ({}, None),  # negative control: the same launch without the option is accepted
    (dict(moe_a2a_backend="deepep"), "--moe-a2a-backend=deepep"),
    (dict(speculative_algorithm="EAGLE"), "--speculative-algorithm=EAGLE"),
    (dict(quantization="fp8"), "--quantization=fp8"),
    (dict(kv_cache_dtype="fp8_e4m3"), "--kv-cache-dtype=fp8_e4m3"),
])
def test_unsupported_options_refused_at_start_up(extra, flag, tmp_path_factory):
    from sp_core_sglang.cli_engine import engine_process

    model_dir = str(tmp_path_factory.getbasetemp() / "options-v3")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        make_checkpoint("deepseek-v3", model_dir)
    error, _, _ = engine_process.call(_resolve, model_dir, extra)
    if flag is None:
        assert error is None, error
    else:
        assert error is not None and flag in error and "\n" not in error, error


def test_v32_kept_off_sglangs_gpu_only_dsa_path(tmp_path_factory):
    """sglang 0.5.23 would treat the V3.2 checkpoint as DSA (a dsa backend / DSATokenToKVPool, GPU-only
    resolution steps); the adapter moves index_topk under its own key through sglang's
    --json-model-override-args, keeping any override the user gave, and the backend asked for."""
    import json as json_

    from sp_core_sglang.cli_engine import engine_process
    from sp_core_sglang.options import HIDDEN_INDEX_TOPK

    model_dir = make_checkpoint("deepseek-v32", str(tmp_path_factory.mktemp("v32") / "v32"))
    error, overrides, backend = engine_process.call(_resolve, model_dir,
                                                    {"json_model_override_args": '{"rms_norm_eps": 1e-6}'})
    assert error is None, error
    assert json_.loads(overrides) == {"rms_norm_eps": 1e-6, "index_topk": None, HIDDEN_INDEX_TOPK: 3}
    assert backend == "torch_native"


def test_cli_logits_sglang_deepseek(tmp_path):
    """`sp-core logits --engine sglang --moe-parallel ep` on DeepSeek-V3 at tp 2 (SP on by default; sglang's
    --ep-size 2) equals transformers."""
    from safetensors.torch import load_file

    from sp_core.app.cli import main
    from sp_core.app.tiny import reference_logprobs

    model_dir = make_checkpoint("deepseek-v3", str(tmp_path / "v3"))
    prompts_path, out = tmp_path / "prompts.json", tmp_path / "out.safetensors"
    prompts_path.write_text(json.dumps(PROMPTS))
    assert main(["logits", "--model", model_dir, "--prompts", str(prompts_path), "--out", str(out),
                 "--engine", "sglang", "--tp", "2", "--moe-parallel", "ep"]) == 0
    got = load_file(str(out))
    ref = reference_logprobs(model_dir, PROMPTS)
    diff = max((got[f"logprobs.{i}"] - r).abs().max().item() for i, r in enumerate(ref))
    print(f"sp-core logits --engine sglang --moe-parallel ep deepseek-v3 tp 2: max |d| vs transformers {diff:.2e}")
    assert diff <= 1e-4
