"""sp_core's sglang adapter inside the real sglang.Engine (CPU, float32, torch_native attention).

Each engine start costs ~15-50 s on this machine, so one module-scoped engine per model and tp serves
several checks, its SP-off and SP-on settings too (switched through ``sp_core_sglang.control``). Collectives are counted through SP_CORE_COLLECTIVE_LOG, which sp_core.mpu appends to
from sglang's worker processes: "<pid> <op> <shape> <route>" per collective.
"""
import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from sp_core.app.tiny import PROMPTS, make_checkpoint, reference_logprobs
from support.serving import generate, hf_greedy, read_collectives

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed"),
    pytest.mark.timeout(300),
]

NEW_TOKENS = 8
# mixed lengths, a 1-token prompt among them (fewer tokens than ranks under SP)
MIXED_PROMPTS = [[int(t) for t in torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(n))]
                 for n in (5, 1, 13, 3, 8, 2, 17, 6)]
# (model, tp, SP, SP_CORE_SP_MIN_TOKENS); one engine per model and tp: its SP-off and SP-on settings share it,
# SP switched through the adapter's collective_rpc (sp_core_sglang.control)
SETTINGS = [("qwen2", 1, False, 0), ("qwen2", 2, False, 0), ("qwen2", 2, True, 0),
            ("qwen3", 1, False, 0), ("qwen3", 2, False, 4), ("qwen3", 2, True, 4)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sglang")
    out = {}
    for name in ("qwen2", "qwen3"):
        d = make_checkpoint(name, str(root / name))
        with open(os.path.join(d, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        out[name] = dict(dir=d, vocab=vocab, ref=reference_logprobs(d, PROMPTS),
                         greedy=hf_greedy(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(),
                                          MIXED_PROMPTS, NEW_TOKENS))
    return out


class Served:
    """A running engine, its setting and the collective log its workers append to."""

    def __init__(self, engine, setting, ckpt, log_path):
        self.engine, self.ckpt, self.log_path = engine, ckpt, log_path
        self.name, self.tp, self.sp, self.sp_min_tokens = setting

    def collectives(self):
        """Counter of (pid, op, shape) lines logged so far; clears the log. Every collective must have gone
        through sglang's GroupCoordinator (its custom all-reduce / graph-safe paths on GPU)."""
        return collections.Counter(line[:3] for line in read_collectives(self.log_path))


def _start(model_dir, tp, log_path, adapter=True, sp_min_tokens=0, **kwargs):
    from sp_core_sglang.cli_engine.engine import start_engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SP_CORE_COLLECTIVE_LOG", log_path)  # the workers inherit it at start
        return start_engine(model_dir, tp, adapter=adapter, sp_min_tokens=sp_min_tokens if adapter else None,
                            disable_radix_cache=True, **kwargs)


@pytest.fixture(scope="module")
def engines():
    """The running engine, by (model, tp, SP_CORE_SP_MIN_TOKENS): one at a time, shut down at the end."""
    running = {}
    yield running
    for engine, _ in running.values():
        engine.shutdown()


@pytest.fixture(scope="module", params=SETTINGS,
                ids=[f"{n}-tp{t}-sp{'on' if s else 'off'}" for n, t, s, _ in SETTINGS])
def served(request, checkpoints, engines, tmp_path_factory):
    from sp_core_sglang import control

    name, tp, sp, sp_min_tokens = request.param
    ckpt = checkpoints[name]
    key = (name, tp, sp_min_tokens)
    if key not in engines:
        for engine, _ in engines.values():
            engine.shutdown()
        engines.clear()
        log_path = str(tmp_path_factory.mktemp("log") / "collectives.log")
        engines[key] = _start(ckpt["dir"], tp, log_path, sp_min_tokens=sp_min_tokens, enable_layernorm_sp=tp > 1), log_path
    engine, log_path = engines[key]
    if tp > 1:
        control.set_sequence_parallel(engine, sp)
    yield Served(engine, request.param, ckpt, log_path)


def _generate(engine, prompts, return_logprob=False):
    return generate(engine, prompts, return_logprob=return_logprob,
                    sampling_params={"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})


def test_logprobs_equal_transformers(served):
    from sp_core_sglang.cli_engine.engine import logprobs_for_prompts

    got = logprobs_for_prompts(served.engine, PROMPTS, served.ckpt["vocab"])
    diff = max((a - b).abs().max().item() for a, b in zip(got, served.ckpt["ref"]))
    print(f"{served.name} tp={served.tp} sp={served.sp}: max |d logprob| vs transformers {diff:.2e}")
    assert diff <= 1e-4


def test_generation_equals_transformers_and_batching(served):
    """Greedy tokens equal transformers' generate; 8 concurrent requests equal the same one at a time."""
    together = _generate(served.engine, MIXED_PROMPTS, return_logprob=True)
    alone = [_generate(served.engine, [p], return_logprob=True)[0] for p in MIXED_PROMPTS]
    for i, (a, b, want) in enumerate(zip(together, alone, served.ckpt["greedy"])):
        assert a["output_ids"] == want, f"prompt {i} (concurrent): {a['output_ids']} vs transformers {want}"
        assert b["output_ids"] == want, f"prompt {i} (alone): {b['output_ids']} vs transformers {want}"
        la = torch.tensor([x[0] for x in a["meta_info"]["output_token_logprobs"]])
        lb = torch.tensor([x[0] for x in b["meta_info"]["output_token_logprobs"]])
        assert (la - lb).abs().max() <= 1e-5, f"prompt {i}: concurrent vs alone log-probs"


def _ops(lines):
    ops = collections.Counter()
    for (_, op, _), n in lines.items():
        ops[op] += n
    return ops


def test_collectives_show_sp_in_prefill_only(served):
    prompt = [3, 1, 4, 1, 5, 9]
    served.collectives()  # clear
    served.engine.generate(input_ids=[prompt], sampling_params={"temperature": 0.0, "max_new_tokens": 1})
    prefill = served.collectives()
    _generate(served.engine, [prompt])
    with_decode = served.collectives()
    if served.tp == 1:
        assert not prefill and not with_decode, "tp 1 issues no collectives"
        from sp_core_sglang import control

        with pytest.raises(Exception, match="started without --enable-layernorm-sp"):
            control.set_sequence_parallel(served.engine, True)  # SP only where sglang's checks of the flag ran
        return
    assert not prefill - with_decode, "the generation's prefill should repeat the first request's collectives"
    decode = with_decode - prefill
    ops_prefill, ops_decode = _ops(prefill), _ops(decode)
    if served.sp:
        assert ops_prefill["reduce_scatter"] > 0 and ops_prefill["all_gather"] > 0 and not ops_prefill["all_reduce"]
    else:
        assert ops_prefill["all_reduce"] > 0 and not ops_prefill["reduce_scatter"] and not ops_prefill["all_gather"]
    assert ops_decode["all_reduce"] > 0 and not ops_decode["reduce_scatter"] and not ops_decode["all_gather"]
    assert all(shape.startswith("(1,") for (_, _, shape) in decode), "decode batches hold one token per request"
    assert len({pid for (pid, _, _) in prefill}) == served.tp, "every TP worker runs the core"

    short = [2, 7, 1]  # SP_CORE_SP_MIN_TOKENS: prefill batches below it run plain TP
    served.engine.generate(input_ids=[short], sampling_params={"temperature": 0.0, "max_new_tokens": 1})
    assert (_ops(served.collectives())["reduce_scatter"] > 0) == (served.sp and len(short) >= served.sp_min_tokens)


def test_without_the_switch_sglang_runs_its_own_qwen3(checkpoints, tmp_path):
    """Installed but not enabled: sglang's own Qwen3 (and its own layernorm SP) serves; the core never runs."""
    log_path = str(tmp_path / "collectives.log")
    ckpt = checkpoints["qwen3"]
    engine = _start(ckpt["dir"], 2, log_path, adapter=False, enable_layernorm_sp=True)
    try:
        from sp_core_sglang.cli_engine.engine import logprobs_for_prompts

        got = logprobs_for_prompts(engine, PROMPTS, ckpt["vocab"])
    finally:
        engine.shutdown()
    assert max((a - b).abs().max().item() for a, b in zip(got, ckpt["ref"])) <= 1e-4
    assert not os.path.exists(log_path), "sp_core's layers ran although SP_CORE_SGLANG was not set"


def test_plugin_does_nothing_unless_enabled():
    code = ("import sys; from sp_core_sglang.plugin import load_plugin; load_plugin(); "
            "assert 'sglang' not in sys.modules, 'the plugin imported sglang'")
    env = {k: v for k, v in os.environ.items() if k != "SP_CORE_SGLANG"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def test_cpu_fallbacks_only_where_the_real_packages_are_missing(tmp_path):
    """sp_core_sglang.cli_engine.cpu_backend goes on the path only for what this environment lacks."""
    code = ("import json, os, sys; from sp_core_sglang.cli_engine import cpu_backend, cpu_env\n"
            "cpu_env.apply_cpu_engine_env(2)\n"
            "print(json.dumps([cpu_backend.missing(), cpu_backend.DIR in sys.path,\n"
            "                  cpu_backend.DIR in os.environ['PYTHONPATH'].split(os.pathsep)]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(extra_path):
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=extra_path), check=True,
                             capture_output=True, text=True, timeout=60).stdout
        return json.loads(out.splitlines()[-1])

    assert run("") == [["sgl_kernel", "torchvision"], True, True]
    for name in ("sgl_kernel", "torchvision"):  # a "real" install of both: no fallback
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    assert run(str(tmp_path)) == [[], False, False]


def test_sp_for_an_architecture_the_core_lacks_fails_at_start(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError) as err:
        _start(str(tmp_path), 2, str(tmp_path / "log"), enable_layernorm_sp=True).shutdown()
    message = str(err.value)
    print(message)
    assert "\n" not in message.strip(), message
    assert "--enable-layernorm-sp" in message and "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message


def test_sp_threshold_default_comes_per_family_from_the_measured_crossover(monkeypatch):
    """The SP_CORE_SP_MIN_TOKENS default: the crossover measured for the model family and tp size on
    this platform (DeepSeek's, not Qwen's, for MLA models); the fallback where none was measured; the
    variable wins when set; a bad value is one error line."""
    from sp_core.models import ModelConfig, ModelError
    from sp_core.mpu import crossover, platform
    from sp_core.app.tiny import hf_config
    from sp_core_sglang.models import causal_lm

    qwen, deepseek = (ModelConfig.from_dict(hf_config(name).to_dict()) for name in ("qwen3", "deepseek-v3"))
    monkeypatch.delenv(causal_lm.SP_MIN_TOKENS_ENV, raising=False)
    monkeypatch.setattr(platform, "backend", lambda: "nccl")
    monkeypatch.setattr(crossover, "SP_PREFILL_MIN_TOKENS", {"qwen": {"nccl:2": 32768, "nccl:4": 8192},
                                                             "deepseek": {"nccl:2": 4096, "nccl:4": 2048}})
    assert causal_lm.sp_min_tokens(qwen, 2) == 32768 and causal_lm.sp_min_tokens(qwen, 4) == 8192
    assert causal_lm.sp_min_tokens(deepseek, 2) == 4096 and causal_lm.sp_min_tokens(deepseek, 4) == 2048
    assert causal_lm.sp_min_tokens(deepseek, 8) == causal_lm.DEFAULT_SP_MIN_TOKENS  # t = 8 not measured
    monkeypatch.setattr(platform, "backend", lambda: "gloo")  # no CPU crossover: the fallback
    assert causal_lm.sp_min_tokens(deepseek, 4) == causal_lm.DEFAULT_SP_MIN_TOKENS
    from sp_core import settings

    setting = settings.read({causal_lm.SP_MIN_TOKENS_ENV: "0"}).sp_min_tokens  # as the model's Settings hold it
    assert causal_lm.sp_min_tokens(deepseek, 4, setting) == 0
    with pytest.raises(ModelError, match="SP_CORE_SP_MIN_TOKENS='lots': expected a non-negative integer"):
        causal_lm.sp_min_tokens(qwen, 2, settings.read({causal_lm.SP_MIN_TOKENS_ENV: "lots"}).sp_min_tokens)


def test_sp_evidence_check_fails_where_sp_did_not_run_as_asked():
    """``logprobs``' check of the workers' collectives (what verify's sglang SP rows rest on), on made-up logs:
    SP on needs reduce-scatters from every worker; SP off, from none."""
    from collections import Counter

    from sp_core_sglang.cli_engine.engine import check_sequence_parallel_ran

    sp = {1: Counter(reduce_scatter=5, all_gather=5), 2: Counter(reduce_scatter=5, all_gather=5)}
    tp = {1: Counter(all_reduce=5), 2: Counter(all_reduce=5)}
    check_sequence_parallel_ran(sp, 2, True)
    check_sequence_parallel_ran(tp, 2, False)
    for collectives, asked in ((tp, True), ({1: sp[1], 2: tp[2]}, True), ({}, True), (sp, False)):
        with pytest.raises(RuntimeError, match="SP"):
            check_sequence_parallel_ran(collectives, 2, asked)


def test_cpu_fallback_murmur_hash_equals_murmur3(tmp_path):
    """The CPU fallback's ``murmur_hash32_cpu`` (sglang's seeded sampler, every sampled request of
    --enable-deterministic-inference) equals MurmurHash3_x86_32 of (seed low word, seed high word, position,
    column) with hash seed 0, computed here in plain Python ints from the published algorithm."""
    code = ("import sys; from sp_core_sglang.cli_engine import cpu_backend; sys.path.insert(0, cpu_backend.DIR)\n"
            "import torch, sgl_kernel\n"
            "h = torch.ops.sgl_kernel.murmur_hash32_cpu.default(torch.tensor([42, 2**40 + 5]), torch.tensor([3, 70000]),"
            " torch.arange(6))\n"
            "print(h.dtype, h.tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)

    def murmur3(words):
        h, mask = 0, 0xFFFFFFFF
        for k in words:
            k = (k * 0xCC9E2D51) & mask
            k = ((k << 15) | (k >> 17)) & mask
            h ^= (k * 0x1B873593) & mask
            h = ((h << 13) | (h >> 19)) & mask
            h = (h * 5 + 0xE6546B64) & mask
        h ^= 4 * len(words)
        for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
            h = ((h ^ (h >> shift)) * mult) & mask
        return h ^ (h >> 16)

    expected = [[murmur3([s & 0xFFFFFFFF, s >> 32, p, c]) for c in range(6)] for s, p in ((42, 3), (2**40 + 5, 70000))]
    assert out[0] == "torch.uint32" and json.loads(out[1]) == expected
