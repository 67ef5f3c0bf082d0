"""The refit's reshard (trainer tp or MoE mode != the server's): every server rank's parameters, filled from every
trainer rank's shared-memory payload by ``sp_core_sglang.refit.reshard_plan`` + ``commit``, equal the parameters
the core's Hugging Face loader gives that rank (the independent reference), bit for bit: tp 2 -> 1 and tp 1 -> 2,
Qwen3 (one KV head: rows replicated at tp 2) and DeepSeek-V3 (MLA, TP-sharded experts); DeepSeek-V3 with experts
held whole per rank (``ep``) at another tp and across MoE modes (tp 2 ep -> tp 1, tp 1 -> tp 2 ep, tp 2 tp <-> tp 2
ep). No sglang engine: the server side's planning and copying run in the ranks; one 2-rank launch for every case."""
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


def _case_name(case):
    model, t, t_mode, s, s_mode = case
    return f"{model} tp {t} {t_mode} -> tp {s} {s_mode}"


def _server_fill(model, payloads):
    from sp_core_sglang import refit as server

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    copies = server.reshard_plan(dict(model.named_parameters()), payloads, model.parallel.size)
    model._sp_core_refit = (7, copies)
    server.commit(model, 7)


def _mismatches(model, reference):
    ref = dict(reference.named_parameters())
    return [name for name, p in model.named_parameters() if not torch.equal(p, ref[name])]


def _rank(root):
    import tempfile

    from sp_core import mpu
    from sp_core.app.runtime import load_model
    from sp_core.mpu import collectives
    from sp_core.procs.shared_memory import write_buckets
    from sp_core_megatron.refit import layout, local_tensors
    from sp_core_sglang import refit as server_refit

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
                out[f"{_case_name(case)} matched"] = (server_refit._matched(payloads, server_tp, server),
                                                      server_refit._matched(payloads, trainer_tp, trainer)
                                                      if trainer_tp == 2 else None)
                if trainer_tp == 2:  # one trainer rank's payload only: its rows / experts are all there is
                    try:
                        server_refit.reshard_plan(dict(server.named_parameters()), payloads[:1], server_tp)
                        out[f"{_case_name(case)} refusal"] = None
                    except server_refit.RefitRefused as err:
                        out[f"{_case_name(case)} refusal"] = str(err)
                _server_fill(server, payloads)
                out[f"{_case_name(case)} rank {wide.rank}"] = _mismatches(server, reference)
            collectives.barrier(wide)
    return out


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
