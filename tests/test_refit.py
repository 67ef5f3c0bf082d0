"""In-memory refit from Megatron (SPCoreGPTModel, tp 2, SP, deterministic mode) into a running sglang.Engine
(tp 2, the adapter, radix cache on), at matched layout. One engine start and one Megatron launch serve every
check; rank 0 of the launch drives the engine through its pickled handle.

The reference for what the engine serves after a refit is Megatron's own forward of the same weights
(another process, another framework's batch layout) -- bitwise equal in the deterministic mode -- and, for a
refused refit, what the engine served before it (bitwise)."""
import importlib.util
import json
import math
import os

import pytest
import torch

from sp_core.app.tiny import make_checkpoint
from support.multirank import run_ranks

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None or importlib.util.find_spec("megatron") is None,
                       reason="sglang and megatron-core are needed"),
    pytest.mark.timeout(600),
]

PROMPTS = [[1, 5, 9, 3, 4, 8, 2], [7, 3], [2, 8, 60, 11, 13]]
CACHED = [int(t) for t in torch.randint(0, 100, (24,), generator=torch.Generator().manual_seed(3))]
LONG = [4, 9, 1]


def _served(engine, prompts, vocab):
    from sp_core_sglang.cli_engine.engine import logprobs_for_prompts

    return logprobs_for_prompts(engine, prompts, vocab)


def _version(engine, prompt=(1, 2)):
    out = engine.generate(input_ids=list(prompt), sampling_params={"temperature": 0.0, "max_new_tokens": 1})
    return out["meta_info"].get("weight_version")


def _last_logprob(engine, prompt):
    """The log-probability of the prompt's last token and how many prompt tokens came from the radix cache."""
    out = engine.generate(input_ids=list(prompt), sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                          return_logprob=True, logprob_start_len=len(prompt) - 2)
    return out["meta_info"]["input_token_logprobs"][-1][0], out["meta_info"]["cached_tokens"]


def _generate_during_refit(engine, payloads, version):
    """In the engine host: a long request starts, then the refit is asked for, then a short request."""
    import asyncio

    from sp_core_sglang import refit

    greedy = {"temperature": 0.0, "max_new_tokens": 48, "ignore_eos": True}

    async def run():
        long = asyncio.ensure_future(engine.async_generate(input_ids=LONG, sampling_params=greedy))
        await asyncio.sleep(0.5)
        update = asyncio.ensure_future(refit.apply_async(engine, payloads, version))
        await asyncio.sleep(0.2)
        late = asyncio.ensure_future(engine.async_generate(input_ids=LONG, sampling_params=dict(greedy, max_new_tokens=4)))
        return await long, await update, await late

    long, update, late = engine.loop.run_until_complete(run())
    return dict(update, long=long, late=late)


def _perturb(model, seed):
    from sp_core_megatron.refit import core_model

    rank = core_model(model).parallel.rank
    with torch.no_grad():
        for i, (_, p) in enumerate(core_model(model).named_parameters()):
            # a replicated parameter gets the same change on every rank (as an optimizer step gives it)
            sharded = getattr(p, "tensor_model_parallel", False)
            gen = torch.Generator().manual_seed(seed * 100003 + i * 7 + (rank if sharded else 0) * 1000003)
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _rank(model_dir, engine, vocab, log_prefix):
    from sp_core_megatron.cli_engine.engine import build_model, model_logprobs
    from sp_core_megatron.refit import core_model, local_tensors, refit, send
    from support.multirank import collective_log

    model = build_model(model_dir, 2, True, deterministic=True).eval()
    parallel = core_model(model).parallel
    first = parallel.rank == 0
    out = {}
    if first:
        out["before"] = _served(engine, PROMPTS, vocab)
        out["version_before"] = _version(engine)
        _last_logprob(engine, CACHED)  # now in the radix cache

    _perturb(model, 1)
    with collective_log(log_prefix) as gathered:
        r1, out["gathered_in_refit"] = gathered(lambda: refit(model, engine, "v1", bucket_bytes=4096))
    out["r1"] = vars(r1)
    out["megatron_v1"] = model_logprobs(model, PROMPTS)
    out["megatron_cached_v1"] = model_logprobs(model, [CACHED])[0][-2, CACHED[-1]].item()
    out["own_bytes"] = sum(p.numel() * p.element_size() for p in core_model(model).parameters())
    if first:
        out["served_v1"] = _served(engine, PROMPTS, vocab)
        out["version_v1"] = _version(engine)
        out["cached_after_refit"] = _last_logprob(engine, CACHED)
        out["cached_again"] = _last_logprob(engine, CACHED)

    # refused refits: each leaves v1 served
    good = local_tensors(model)
    names = [n for n, _ in good]
    bad = {
        "missing": good[:-1] if parallel.rank == 1 else good,
        "unexpected": good + [("model.layers.0.extra.weight", torch.zeros(3))] if parallel.rank == 0 else good,
        "shape": [(n, t[:-1] if n == names[0] and parallel.rank == 0 else t) for n, t in good],
        "dtype": [(n, t.double() if n == names[1] and parallel.rank == 1 else t) for n, t in good],
        "nan": [(n, _with(t, float("nan")) if n == names[-1] and parallel.rank == 1 else t) for n, t in good],
        "inf": [(n, _with(t, float("inf")) if n == names[2] and parallel.rank == 0 else t) for n, t in good],
    }
    out["refused"] = {kind: vars(send(parallel, tensors, engine, f"bad-{kind}")) for kind, tensors in bad.items()}
    if first:
        out["served_after_refused"] = _served(engine, PROMPTS, vocab)
        out["version_after_refused"] = _version(engine)

    # under concurrent requests
    _perturb(model, 2)
    load = lambda e, payloads, version: e.call(_generate_during_refit, payloads, version)  # noqa: E731
    r2 = send(parallel, local_tensors(model), engine, "v2", load=load)
    out["concurrent"] = r2.answer
    out["megatron_v2"] = model_logprobs(model, PROMPTS)
    if first:
        out["served_v2"] = _served(engine, PROMPTS, vocab)
        out["version_v2"] = _version(engine)

    # megatron.core's GPTModel with the core's layer spec, loaded from the checkpoint: the engine (now serving v2)
    # serves the checkpoint's weights again, bitwise as it did at start
    from megatron.core.models.gpt import GPTModel

    from sp_core_megatron import get_sp_core_block_spec, gpt_model_args, load_hf_into_gpt_model, transformer_config_from_hf

    from megatron.core import tensor_parallel

    from sp_core_megatron.cli_engine import cpu_training

    cpu_training.enable()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = transformer_config_from_hf(model_dir, tp=2, sequence_parallel=True, deterministic_mode=True)
    gpt = GPTModel(config, get_sp_core_block_spec(config.num_layers), **gpt_model_args(config))
    load_hf_into_gpt_model(gpt, model_dir)
    out["gpt"] = vars(refit(gpt, engine, "gpt"))
    if first:
        out["served_gpt"] = _served(engine, PROMPTS, vocab)

    # sp-core onpolicy's loop on this engine: 2 iterations of sample -> compare -> train -> refit
    from sp_core_megatron.cli_engine import onpolicy

    out["onpolicy"] = onpolicy.rank(model_dir, engine, 2, True, "tp", True, 2, PROMPTS, 4, 1e-3, 8192)

    # colocation (sp_core_sglang.colocate): released, the weights resumed (NaN-filled on CPU, where sglang's release
    # keeps them) serve NaN; the refit of the checkpoint's GPTModel rewrites every one: the checkpoint served bitwise
    from sp_core_sglang import colocate

    if first:
        colocate.release(engine)
        colocate.resume_weights(engine)
        out["served_released"] = _last_logprob(engine, CACHED)[0]
    out["colocated"] = vars(refit(gpt, engine, "colocated"))
    if first:
        colocate.resume_cache(engine)
        out["served_colocated"] = _served(engine, PROMPTS, vocab)
        out["version_colocated"] = _version(engine)

    # the loop colocated, its training step diverged (lr inf): the refit after the release is refused, the loop stops
    # (last: the engine holds NaN weights afterwards)
    out["onpolicy_refused"] = onpolicy.rank(model_dir, engine, 2, True, "tp", True, 1, PROMPTS, 4, float("inf"), 8192,
                                            colocate=True)
    return out


def _with(t, value):
    t = t.clone()
    t.view(-1)[0] = value
    return t


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from sp_core_sglang.cli_engine.engine import start_engine

    root = tmp_path_factory.mktemp("refit")
    model_dir = make_checkpoint("qwen3", str(root / "qwen3"))
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    engine = start_engine(model_dir, 2, adapter=True, sp_min_tokens=0, enable_layernorm_sp=True,
                          enable_deterministic_inference=True)  # radix cache on (default)
    try:
        yield run_ranks(2, _rank, model_dir, engine, vocab, str(root / "collectives"))[0]
    finally:
        engine.shutdown()


def _bitwise(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_refit_serves_the_trainer_weights_bitwise(result):
    assert result["r1"]["success"], result["r1"]["message"]
    assert not _bitwise(result["before"], result["served_v1"])  # the weights did change
    assert _bitwise(result["served_v1"], result["megatron_v1"])


def test_matched_layout_moves_own_shards_only(result):
    r1 = result["r1"]
    assert r1["full_tensors"] == 0
    assert r1["bytes_moved"] == result["own_bytes"]
    assert r1["buckets"] > 1  # bucket_bytes 4096: several shared-memory segments
    assert result["gathered_in_refit"] == []  # no sp_core all-gather ran on the trainer during the refit


def test_weight_version_advances(result):
    assert result["version_before"] != "v1"
    assert result["version_v1"] == "v1"
    assert result["version_v2"] == "v2"


def test_radix_cache_flushed_by_refit(result):
    logprob, cached = result["cached_after_refit"]
    assert cached == 0  # the prefix cached under the old weights was not reused
    assert logprob == result["megatron_cached_v1"]
    assert result["cached_again"][1] > 0  # control: the cache works, so the check above can fail


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape", "dtype", "nan", "inf"])
def test_refused_refit_changes_nothing(result, kind):
    refused = result["refused"][kind]
    assert not refused["success"]
    message = refused["message"]
    assert message.startswith("refit refused by server rank") and "\n" not in message, message
    expected = {"missing": "missing", "unexpected": "unexpected", "shape": "shape", "dtype": "dtype",
                "nan": "NaN or inf", "inf": "NaN or inf"}[kind]
    assert expected in message, message
    assert _bitwise(result["served_after_refused"], result["served_v1"])
    assert result["version_after_refused"] == "v1"


def test_refit_under_concurrent_requests(result):
    """Documented (sp_core_sglang.refit): a running request finishes with the old weights and reports them;
    one that arrives while the refit waits runs with the new weights."""
    answer = result["concurrent"]
    assert answer["success"], answer["message"]
    assert answer["long"]["meta_info"]["weight_version"] == "v1"
    assert len(answer["long"]["output_ids"]) == 48
    assert answer["late"]["meta_info"]["weight_version"] == "v2"
    assert _bitwise(result["served_v2"], result["megatron_v2"])



def test_refit_from_gpt_model_with_the_core_layer_spec(result):
    assert result["gpt"]["success"], result["gpt"]["message"]
    assert result["gpt"]["full_tensors"] == 0
    assert _bitwise(result["served_gpt"], result["before"])


def test_onpolicy_loop_is_bitwise_every_iteration(result):
    loop = result["onpolicy"]
    assert [r["weight_version"] for r in loop["rows"]] == ["0", "1"]
    assert all(r["bitwise"] and r["version_advanced"] and r["full_tensors"] == 0 for r in loop["rows"]), loop["rows"]
    assert all(min(r["buckets_per_rank"]) > 1 for r in loop["rows"])  # the loop's bucket size (8 KiB) reached the refit
    assert loop["after_last_refit"] == {"weight_version": "2", "max_abs_delta": 0.0, "bitwise": True}
    assert loop["rows"][1]["loss"] < loop["rows"][0]["loss"]  # the step trained the model that is served


def test_colocated_refit_rewrites_every_released_weight(result):
    """sglang's release_memory_occupation keeps the weights on CPU; the resume overwrites them with NaN (what a GPU
    release leaves), which is served until the refit: then the checkpoint's weights, bitwise as at start."""
    assert math.isnan(result["served_released"])  # control: without the refit the loop would serve NaN
    assert result["colocated"]["success"], result["colocated"]["message"]
    assert _bitwise(result["served_colocated"], result["before"])
    assert result["version_colocated"] == "colocated"


def test_onpolicy_stops_when_a_refit_after_a_release_is_refused(result):
    loop = result["onpolicy_refused"]
    assert loop["rows"] == [] and loop["after_last_refit"] is None
    stopped = loop["stopped"]
    assert stopped.startswith("iteration 1: the refit was refused (refit refused by server rank") and "\n" not in stopped
    assert "holds NaN or inf" in stopped and stopped.endswith("so it holds no valid weights"), stopped


def test_onpolicy_verdict_fails_what_it_must():
    """sp-core onpolicy's exit: a run passes only if every iteration agrees (bitwise when asked) and every refit's
    version is the one served next; hand-made rows, each with one fault."""
    from sp_core.app.onpolicy import verdict

    good = {"iteration": 1, "refit_version": "1", "version_advanced": True, "max_abs_delta": 0.0, "bitwise": True}
    last = {"weight_version": "1", "max_abs_delta": 0.0, "bitwise": True}
    assert verdict([good], last, bitwise_expected=True) == []
    close = dict(good, max_abs_delta=3e-7, bitwise=False)
    assert verdict([close], last, bitwise_expected=False) == []
    assert verdict([close], last, bitwise_expected=True) == ["iteration 1: not bitwise 3e-07"]
    assert verdict([dict(close, max_abs_delta=2e-5)], last, bitwise_expected=False) == ["iteration 1: off by 2e-05"]
    assert verdict([dict(good, version_advanced=False)], last, True) == [
        "iteration 1: the served version did not become 1"]
    assert verdict([good], dict(last, bitwise=False, max_abs_delta=1e-6), True) == [
        "after the last refit: max |d logprob| 1e-06"]
    assert verdict([good], None, True, stopped="iteration 2: the refit was refused (x)") == [
        "stopped: iteration 2: the refit was refused (x)"]


def test_onpolicy_command_stops_in_one_line_and_exit_1_on_a_refused_refit(tmp_path, monkeypatch, capsys):
    """The command's side of a loop stopped by a refused refit (the loop itself: test_onpolicy_stops_when_...):
    the engine and the trainer stand in here, returning what the loop returns then; one FAIL line, exit 1, the
    JSON says why."""
    from types import SimpleNamespace

    from sp_core.app import engines
    from sp_core.app.cli import main

    stopped = ("iteration 1: the refit was refused (refit refused by server rank 0: model.norm.weight: holds NaN or "
               "inf); the engine's weights were released before it, so it holds no valid weights")
    shut = []
    sglang = SimpleNamespace(check_available=lambda: None,
                             start_for_refit=lambda *a, **k: SimpleNamespace(shutdown=lambda: shut.append(1)))
    megatron = SimpleNamespace(check_available=lambda: None,
                               onpolicy=lambda *a: {"rows": [], "after_last_refit": None, "stopped": stopped})
    monkeypatch.setattr(engines, "get", {"sglang": sglang, "megatron": megatron}.__getitem__)
    report = tmp_path / "run.json"
    code = main(["onpolicy", "--colocate", "--json", str(report)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and shut == [1]
    assert err[-1] == f"sp-core onpolicy: FAIL (stopped: {stopped})" and "Traceback" not in "\n".join(err)
    run = json.loads(report.read_text())
    assert run["stopped"] == stopped and not run["passed"] and run["colocate"]


def test_onpolicy_promises_bitwise_where_the_deterministic_mode_does():
    """Bitwise in the deterministic mode at the same layout (every model, DeepSeek-V3.2's sparse attention
    included); another server tp or MoE mode, or the default mode: within 1e-5."""
    from sp_core.app.onpolicy import bitwise_promised

    assert bitwise_promised(True, True)
    assert not bitwise_promised(True, False) and not bitwise_promised(False, True)


def test_readme_refit_example_runs_as_pasted(tmp_path):
    """README's refit example, pasted into a script and run with python as it says (its demo directory moved
    into this test's tmp dir): both trainer ranks' refits succeed with their own bytes and no full tensor, and
    the engine then serves the new version."""
    import os
    import pathlib
    import re
    import subprocess
    import sys

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("## Train → serve in memory")
    section = readme[start:readme.index("\n## ", start)]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    assert '"/tmp/refit-demo"' in block
    (tmp_path / "refit_example.py").write_text(block.replace('"/tmp/refit-demo"', repr(str(tmp_path / "demo"))))
    proc = subprocess.run([sys.executable, "refit_example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\[\(True, '', (\d+), 0\), \(True, '', \1, 0\)\]\nstep-1\n\Z", proc.stdout, re.M), proc.stdout
