"""The refit's reshard (trainer tp or MoE mode != the server's): every server rank's parameters, filled from every
trainer rank's shared-memory payload by ``sp_core_sglang.refit_passes.stage_model`` + ``commit``, equal the parameters
the core's Hugging Face loader gives that rank (the independent reference), bit for bit: tp 2 -> 1 and tp 1 -> 2,
Qwen3 (one KV head: rows replicated at tp 2) and DeepSeek-V3 (MLA, TP-sharded experts); DeepSeek-V3 with experts
held whole per rank (``ep``) at another tp and across MoE modes (tp 2 ep -> tp 1, tp 1 -> tp 2 ep, tp 2 tp <-> tp 2
ep). Streamed (several buckets, two passes): tp 2 -> 1 for Qwen3 and DeepSeek-V3 ep -> tp, and a trainer rank that
cannot write. No sglang engine: the server side's planning and copying run in the ranks; one 2-rank launch for every
case."""
import os

import pytest
import torch

from sp_core.app.tiny import make_checkpoint
from support.multirank import run_ranks

MODELS = ("qwen3", "deepseek-v3")
# (model, trainer tp, trainer MoE mode, server tp, server MoE mode)
CASES = [(m, 2, "tp", 1, "tp") for m in MODELS] + [(m, 1, "tp", 2, "tp") for m in MODELS] + [
    ("deepseek-v3", 2, "ep", 1, "tp"), ("deepseek-v3", 1, "tp", 2, "ep"),
    ("deepseek-v3", 2, "tp", 2, "ep"), ("deepseek-v3", 2, "ep", 2, "tp")]


STREAMED = [("qwen3", 2, "tp", 1, "tp"), ("deepseek-v3", 2, "ep", 1, "tp")]
STREAM_BUCKET = 8192


def _case_name(case):
    model, t, t_mode, s, s_mode = case
    return f"{model} tp {t} {t_mode} -> tp {s} {s_mode}"


def _zero(model):
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


def _server_fill(model, payloads):
    """The server's two passes (``stage_model``, ``commit``) on this rank's model, the ranks agreeing over its group."""
    from sp_core_sglang.refit_passes import commit, stage_model

    _zero(model)
    parallel = model.parallel
    stage_model(model, 7, payloads, parallel.rank, parallel.size, parallel.group if parallel.size > 1 else None)
    commit(model, 7)
    assert model._sp_core_refit_outcome == ""


def _stream_into(server):
    """``send``'s ``load`` on trainer rank 0: the server of tp 1 in this process, beside the trainer's stream."""
    from sp_core_sglang.refit_checks import RefitRefused
    from sp_core_sglang.refit_passes import commit, stage_model

    def load(engine, payloads, version):
        try:
            stage_model(server, 7, payloads, 0, 1)
        except RefitRefused as err:
            return {"success": False, "message": str(err)}
        commit(server, 7)
        return {"success": not server._sp_core_refit_outcome, "message": server._sp_core_refit_outcome}

    return load


def _mismatches(model, reference):
    ref = dict(reference.named_parameters())
    return [name for name, p in model.named_parameters() if not torch.equal(p, ref[name])]


def _rank(root):
    import tempfile

    from sp_core import mpu
    from sp_core.app.runtime import load_model
    from sp_core.mpu import collectives
    from sp_core.procs.shared_memory import write_buckets
    from sp_core_megatron.refit import layout, local_tensors, send
    from sp_core_sglang.refit_checks import RefitRefused
    from sp_core_sglang.refit_reshard import matched_layout, reshard_plan

    wide, one = mpu.default_context(), mpu.single_rank()
    out = {}
    for case in CASES:
        name, trainer_tp, trainer_mode, server_tp, server_mode = case
        model_dir = os.path.join(root, name)
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as shm:
            payload = None
            if trainer_tp == 2 or wide.rank == 0:  # tp 1: rank 0 trains alone (its payload is written once)
                trainer = load_model(model_dir, moe_parallel=trainer_mode, parallel=wide if trainer_tp == 2 else one)
                payload = dict(write_buckets(local_tensors(trainer), shm, 1 << 16), layout=layout(trainer))
            if trainer_tp == 2:
                payloads = collectives.all_gather_objects_over(wide.group, payload)
            else:
                payloads = [collectives.broadcast_object(wide, payload)]
            if server_tp == 2 or wide.rank == 0:
                parallel = wide if server_tp == 2 else one
                server = load_model(model_dir, moe_parallel=server_mode, parallel=parallel)
                reference = load_model(model_dir, moe_parallel=server_mode, parallel=parallel)
                # the stage's choice: reshard (another tp or MoE mode), or each rank its own payload (the trainer's)
                out[f"{_case_name(case)} matched"] = (matched_layout(payloads, server_tp, server),
                                                      matched_layout(payloads, trainer_tp, trainer)
                                                      if trainer_tp == 2 else None)
                if trainer_tp == 2:  # one trainer rank's payload only: its rows / experts are all there is
                    try:
                        reshard_plan(dict(server.named_parameters()), payloads[:1], server_tp)
                        out[f"{_case_name(case)} refusal"] = None
                    except RefitRefused as err:
                        out[f"{_case_name(case)} refusal"] = str(err)
                _server_fill(server, payloads)
                out[f"{_case_name(case)} rank {wide.rank}"] = _mismatches(server, reference)
            collectives.barrier(wide)
    for case in STREAMED:  # trainer tp 2 streaming several buckets into a server of tp 1 on rank 0
        name, _, trainer_mode, _, server_mode = case
        model_dir = os.path.join(root, name)
        trainer = load_model(model_dir, moe_parallel=trainer_mode, parallel=wide)
        server = reference = None
        if wide.rank == 0:
            server = load_model(model_dir, moe_parallel=server_mode, parallel=one)
            reference = load_model(model_dir, moe_parallel=server_mode, parallel=one)
            _zero(server)
        result = send(wide, local_tensors(trainer), None, "v", bucket_bytes=STREAM_BUCKET,
                      load=_stream_into(server) if server is not None else None, layout=layout(trainer))
        out[f"{_case_name(case)} streamed"] = (result.success, result.message, result.buckets, result.passes,
                                               _mismatches(server, reference) if server is not None else None)
    out["write failed"] = _failing_writer(wide, one, os.path.join(root, "qwen3"))
    return out


def _failing_writer(wide, one, model_dir):
    """Trainer rank 1 cannot write its bucket 1 (disk full): the server gives up after its timeout, rank 0 returns
    the refusal, rank 1 raises its own error -- after the answer, so no rank waits for the other."""
    from sp_core.app.runtime import load_model
    from sp_core.procs import shared_memory
    from sp_core_megatron.refit import layout, local_tensors, send

    trainer = load_model(model_dir, parallel=wide)
    server = load_model(model_dir, parallel=one) if wide.rank == 0 else None
    original = shared_memory.write_bucket

    def write(tensors, payload, index, path):
        if index == 1:
            raise OSError(28, "No space left on device")
        original(tensors, payload, index, path)

    if wide.rank == 1:
        shared_memory.write_bucket = write
    try:
        result = send(wide, local_tensors(trainer), None, "v", bucket_bytes=STREAM_BUCKET, timeout=0.5,
                      load=_stream_into(server) if server is not None else None, layout=layout(trainer))
        return ("returned", result.success, result.message)
    except OSError as err:
        return ("raised", str(err))
    finally:
        shared_memory.write_bucket = original


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    for name in MODELS:
        make_checkpoint(name, str(root / name))
    return run_ranks(2, _rank, str(root))


@pytest.mark.parametrize("case", CASES, ids=_case_name)
def test_reshard_fills_every_parameter_exactly(result, case):
    server_ranks = range(case[3])
    for r in server_ranks:
        assert result[r][f"{_case_name(case)} rank {r}"] == []


@pytest.mark.parametrize("case", CASES, ids=_case_name)
def test_stage_reshards_unless_tp_and_moe_mode_match(result, case):
    resharded, own = result[0][f"{_case_name(case)} matched"]
    assert resharded is False
    assert own is (True if case[1] == 2 else None)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == 2], ids=_case_name)
def test_reshard_refuses_rows_no_trainer_rank_sent(result, case):
    message = result[0][f"{_case_name(case)} refusal"]
    assert message is not None and "\n" not in message
    assert "in no trainer rank's payload" in message or "missing from the trainer's tensors" in message


@pytest.mark.parametrize("case", STREAMED, ids=_case_name)
def test_streamed_reshard_fills_every_parameter_exactly(result, case):
    """The trainer's buckets streamed (two passes, at most two buckets held per rank) into a server of another
    tp: bit for bit the core's loader, from several buckets on each trainer rank."""
    success, message, buckets, passes, mismatches = result[0][f"{_case_name(case)} streamed"]
    assert success, message
    assert buckets >= 4 and passes == 2
    assert mismatches == []
    assert result[1][f"{_case_name(case)} streamed"][:4] == (success, message, buckets, passes)


def test_a_trainer_rank_that_cannot_write_stops_the_refit(result):
    assert result[0]["write failed"] == ("returned", False, "refit refused by server rank 0: trainer rank 1 wrote no "
                                                            "bucket 1 of pass 1 within 0.5 s")
    assert result[1]["write failed"] == ("raised", "[Errno 28] No space left on device")
