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
import tempfile

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
PROBE = [61, 17, 5, 33]
STREAM_BUCKET = 16384  # bytes: several buckets per rank of the tiny Qwen3 at tp 2 (~100 KB each)
STALL_TIMEOUT = 2.0  # seconds the engine waits for a bucket in the stall cases (generous on a loaded machine)


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
    """In the engine host: a long request starts, then the refit is asked for; while it runs a probe is sent every
    50 ms, and one more as soon as the commit has asked for sglang's writer lock. The long request and the probes
    are also run alone before the refit (the old weights) and the probe after it (the new weights)."""
    import asyncio

    from sp_core_sglang import refit

    greedy = {"temperature": 0.0, "max_new_tokens": 48, "ignore_eos": True}
    probe = dict(input_ids=PROBE, sampling_params={"temperature": 0.0, "max_new_tokens": 1}, return_logprob=True,
                 logprob_start_len=0)  # input log-probabilities from 0: no radix-cache reuse, every probe computed
    lock = engine.tokenizer_manager.model_update_lock

    async def run():
        before = {"long": await engine.async_generate(input_ids=LONG, sampling_params=greedy, return_logprob=True),
                  "probe": await engine.async_generate(**probe)}
        long = asyncio.ensure_future(engine.async_generate(input_ids=LONG, sampling_params=greedy, return_logprob=True))
        await asyncio.sleep(0.3)
        update = asyncio.ensure_future(refit.apply_async(engine, payloads, version))
        probes, late = [], None
        while not update.done():
            probes.append(asyncio.ensure_future(engine.async_generate(**probe)))
            if late is None and (lock._waiting_writers or lock._writer_active):  # the commit was asked for
                late = asyncio.ensure_future(engine.async_generate(**probe))
            await asyncio.sleep(0.05)
        answer = await update
        after = await engine.async_generate(**probe)
        return dict(answer, long=await long, late=await late if late else None, probes=[await p for p in probes],
                    before=before, after=after)

    return engine.loop.run_until_complete(run())


def _recording_writes(live):
    """Every bucket file written (``shared_memory.write_bucket``) appends to ``live`` the bytes of the files then in
    its directory, read from the filesystem (not from the transport's own count)."""
    from sp_core.procs import shared_memory

    original = shared_memory.write_bucket

    def write(tensors, payload, index, path):
        original(tensors, payload, index, path)
        directory = os.path.dirname(path)
        live.append(sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)))

    shared_memory.write_bucket = write
    return original


def _stall_at(rank, bucket, pass_):
    """On trainer rank ``rank``: the write of ``bucket`` of pass ``pass_`` hangs until the stream is stopped (the
    engine gives up on it), as a stalled trainer rank would."""
    import time

    from sp_core.procs import refit_stream, shared_memory

    original = shared_memory.write_bucket

    def write(tensors, payload, index, path):
        if path == refit_stream.bucket_path(payload, bucket, pass_):
            while not os.path.exists(refit_stream.stop_path(payload)):
                time.sleep(0.01)
            return
        original(tensors, payload, index, path)

    if rank:
        shared_memory.write_bucket = write
    return original


def _stalled_send(parallel, tensors, engine):
    from sp_core_megatron.refit import send

    return send(parallel, tensors, engine, "stalled", STREAM_BUCKET, timeout=STALL_TIMEOUT)


def _changed_at(rank, bucket, pass_):
    """On trainer rank ``rank``: ``bucket`` of pass ``pass_`` is written with other values than the rest (as if the
    parameters changed between the two passes)."""
    from sp_core.procs import refit_stream, shared_memory

    original = shared_memory.write_bucket

    def write(tensors, payload, index, path):
        if path == refit_stream.bucket_path(payload, bucket, pass_):
            tensors = [(n, t + 1) for n, t in tensors]
        original(tensors, payload, index, path)

    if rank:
        shared_memory.write_bucket = write
    return original


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
    from sp_core.mpu import collectives
    from sp_core.procs import shared_memory
    from sp_core_megatron.cli_engine.engine import build_model, model_logprobs
    from sp_core_megatron.refit import core_model, local_tensors, plan_buckets, refit, send
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
    live = []
    original = _recording_writes(live)
    try:
        with collective_log(log_prefix) as gathered:
            r1, out["gathered_in_refit"] = gathered(lambda: refit(model, engine, "v1", bucket_bytes=STREAM_BUCKET))
        out["r1_live"] = live[:]
        live.clear()  # negative control: the same tensors and bucket size, every bucket written at once
        with tempfile.TemporaryDirectory(dir=shared_memory.shm_root()) as directory:
            shared_memory.write_buckets(local_tensors(model), directory, STREAM_BUCKET)
        out["all_at_once_live"] = live[:]
    finally:
        shared_memory.write_bucket = original
    out["largest_tensor"] = max(shared_memory.padded(shared_memory.nbytes_of(t)) for _, t in local_tensors(model))
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
    # streamed (several buckets, two passes): the bad tensor in the last bucket, or (NaN) in the first
    plan = plan_buckets(parallel, good, STREAM_BUCKET)
    last, first_name = max(plan, key=plan.get), min(plan, key=plan.get)
    streamed = {
        "nan_last": [(n, _with(t, float("nan")) if n == last and parallel.rank == 1 else t) for n, t in good],
        "shape_last": [(n, t[:-1] if n == last and parallel.rank == 0 else t) for n, t in good],
        "nan_first": [(n, _with(t, float("nan")) if n == first_name and parallel.rank == 0 else t) for n, t in good],
    }
    out["stream_plan"] = {"buckets": max(plan.values()) + 1, "last": plan[last], "first": plan[first_name]}
    for kind, tensors in streamed.items():
        live = []
        original = _recording_writes(live)
        try:
            out["refused"][kind] = dict(vars(send(parallel, tensors, engine, f"bad-{kind}", STREAM_BUCKET)),
                                        writes=len(live))
        finally:
            shared_memory.write_bucket = original
    # a trainer rank that stalls in pass 1: the engine gives up after its timeout, every rank hears it
    original = _stall_at(parallel.rank, 2, 1)
    try:
        out["refused"]["stall_pass_1"] = vars(_stalled_send(parallel, good, engine))
    finally:
        shared_memory.write_bucket = original
    original = _stall_at(parallel.rank, 0, 2)  # ... in pass 2 before the first copy: nothing changed either
    try:
        out["refused"]["stall_pass_2_first"] = vars(_stalled_send(parallel, good, engine))
    finally:
        shared_memory.write_bucket = original
    out["refused_messages"] = collectives.gather_objects_to_first(
        parallel, {kind: r["message"] for kind, r in out["refused"].items()})
    mine = f"sp-core-refit-{os.getpid()}-"
    out["left_in_shm"] = [f for f in os.listdir(shared_memory.shm_root()) if f.startswith(mine)]
    if first:
        out["served_after_refused"] = _served(engine, PROMPTS, vocab)
        out["version_after_refused"] = _version(engine)

    # under concurrent requests
    _perturb(model, 2)
    load = lambda e, payloads, version: e.call(_generate_during_refit, payloads, version)  # noqa: E731
    r2 = send(parallel, local_tensors(model), engine, "v2", STREAM_BUCKET, load=load)
    out["r2_passes"] = r2.passes
    out["concurrent"] = r2.answer
    out["megatron_v2"] = model_logprobs(model, PROMPTS)
    if first:
        out["served_v2"] = _served(engine, PROMPTS, vocab)
        out["version_v2"] = _version(engine)

    # a trainer rank that stalls in pass 2: half the buckets copied, the refit fails and says so, the engine reports
    # no version it does not hold and keeps serving (the next refit puts it right)
    original = _stall_at(parallel.rank, 2, 2)
    try:
        out["stall_pass_2"] = vars(_stalled_send(parallel, local_tensors(model), engine))
    finally:
        shared_memory.write_bucket = original
    if first:
        out["version_after_stall"] = _version(engine)
    original = _changed_at(parallel.rank, 3, 2)  # bytes that change between the passes are not copied
    try:
        out["changed_in_pass_2"] = vars(send(parallel, local_tensors(model), engine, "changed", STREAM_BUCKET))
    finally:
        shared_memory.write_bucket = original
    if first:
        out["version_after_change"] = _version(engine)

    # megatron.core's GPTModel with the core's layer spec, loaded from the checkpoint: the engine (now serving the
    # stalled refit's mix) serves the checkpoint's weights again, bitwise as it did at start
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
    assert r1["buckets"] > 1  # several shared-memory buckets
    assert result["gathered_in_refit"] == []  # no sp_core all-gather ran on the trainer during the refit


def test_streamed_refit_holds_at_most_two_buckets(result):
    """The shared memory a trainer rank holds at once, read from its refit directory after every bucket written,
    stays within two buckets (a bucket: STREAM_BUCKET bytes, or the largest tensor if larger); every bucket at once
    (the single pass, same tensors and bucket size) does not."""
    r1 = result["r1"]
    bound = 2 * max(STREAM_BUCKET, result["largest_tensor"])
    assert r1["buckets"] >= 4
    assert max(result["r1_live"]) <= bound
    assert r1["passes"] == 2 and len(result["r1_live"]) == 2 * r1["buckets"]  # each bucket written twice
    assert r1["peak_bytes"] <= bound
    assert max(result["all_at_once_live"]) > bound  # negative control
    assert max(result["all_at_once_live"]) >= r1["bytes_moved"]


def test_weight_version_advances(result):
    assert result["version_before"] != "v1"
    assert result["version_v1"] == "v1"
    assert result["version_v2"] == "v2"


def test_radix_cache_flushed_by_refit(result):
    logprob, cached = result["cached_after_refit"]
    assert cached == 0  # the prefix cached under the old weights was not reused
    assert logprob == result["megatron_cached_v1"]
    assert result["cached_again"][1] > 0  # control: the cache works, so the check above can fail


REFUSED = {"missing": "missing", "unexpected": "unexpected", "shape": "shape", "dtype": "dtype", "nan": "NaN or inf",
           "inf": "NaN or inf", "nan_last": "NaN or inf", "shape_last": "shape", "nan_first": "NaN or inf",
           "stall_pass_1": "trainer rank 1 wrote no bucket 2 of pass 1 within 2 s",
           "stall_pass_2_first": "trainer rank 1 wrote no bucket 0 of pass 2 within 2 s"}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_refused_refit_changes_nothing(result, kind):
    refused = result["refused"][kind]
    assert not refused["success"]
    message = refused["message"]
    assert message.startswith("refit refused by server rank") and "\n" not in message, message
    assert REFUSED[kind] in message, message
    messages = result["refused_messages"]
    assert messages[0][kind] == messages[1][kind]  # every trainer rank returns the same refusal
    assert _bitwise(result["served_after_refused"], result["served_v1"])
    assert result["version_after_refused"] == "v1"
    assert result["left_in_shm"] == []


def test_streamed_refusals_from_the_last_bucket_and_early_stops(result):
    """Streamed (two passes): a NaN or a shape in the last bucket is refused like any other (above: nothing changed);
    the NaN is found once every bucket was read once (pass 1), a shape from the descriptions before any value; a
    refusal at the first bucket stops the trainer ranks' writing at once."""
    plan = result["stream_plan"]
    assert plan["buckets"] >= 4 and plan["last"] == plan["buckets"] - 1 and plan["first"] == 0
    refused = result["refused"]
    assert all(refused[kind]["passes"] == 2 for kind in ("nan_last", "shape_last", "nan_first", "stall_pass_1"))
    assert plan["buckets"] <= refused["nan_last"]["writes"] <= plan["buckets"] + 1  # pass 1 whole, pass 2 not run
    assert refused["shape_last"]["writes"] <= 2
    assert refused["nan_first"]["writes"] <= 2


def test_trainer_failing_in_pass_two_leaves_a_failed_refit_and_no_false_version(result):
    """A trainer rank that stops writing in pass 2, or writes other bytes than it did in pass 1: the refit fails on
    every rank with one line saying how far it got, the engine reports the version as incomplete (not the new one)
    and keeps serving; the next refit (the GPTModel's) serves its weights bitwise."""
    stalled = result["stall_pass_2"]
    assert not stalled["success"]
    assert stalled["message"].startswith("refit incomplete: 2 of "), stalled["message"]
    assert "trainer rank 1 wrote no bucket 2 of pass 2 within 2 s" in stalled["message"]
    assert result["version_after_stall"] == "stalled-incomplete"
    changed = result["changed_in_pass_2"]
    assert not changed["success"]
    assert changed["message"] == (f"refit incomplete: 3 of {result['stream_plan']['buckets']} buckets copied, then "
                                  f"refused by server rank 1: bucket 3 changed between the check and the copy")
    assert result["version_after_change"] == "changed-incomplete"
    assert result["gpt"]["success"] and _bitwise(result["served_gpt"], result["before"])


def test_refit_under_concurrent_requests(result):
    """Documented (sp_core_sglang.refit), with the refit streamed in two passes: a running request finishes with the
    old weights and reports them (its tokens and log-probabilities those of the old weights alone); every request
    sent during the refit is served whole by one version -- bitwise what that version serves alone, never a mix;
    one sent once the commit was asked for runs with the new weights."""
    answer = result["concurrent"]
    assert answer["success"], answer["message"]
    assert result["r2_passes"] == 2
    long, before, after = answer["long"], answer["before"], answer["after"]
    assert long["meta_info"]["weight_version"] == "v1"
    assert len(long["output_ids"]) == 48
    assert long["output_ids"] == before["long"]["output_ids"]
    assert long["meta_info"]["output_token_logprobs"] == before["long"]["meta_info"]["output_token_logprobs"]
    served = {"v1": before["probe"]["meta_info"], "v2": after["meta_info"]}
    assert served["v1"]["input_token_logprobs"] != served["v2"]["input_token_logprobs"]  # the weights changed
    probes = answer["probes"] + [answer["late"]]
    for probe in probes:
        meta = probe["meta_info"]
        assert meta["weight_version"] in served
        for key in ("input_token_logprobs", "output_token_logprobs"):
            assert meta[key] == served[meta["weight_version"]][key]
    assert {p["meta_info"]["weight_version"] for p in answer["probes"]} == {"v1", "v2"}  # the probes spanned it
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
    assert all(r["refit_passes"] == 2 for r in loop["rows"])  # streamed, holding at most two buckets per rank:
    assert max(max(r["peak_shm_per_rank"]) for r in loop["rows"]) <= 2 * max(8192, result["largest_tensor"])
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

