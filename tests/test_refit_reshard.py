"""The refit's reshard (trainer tp != server tp): every server rank's parameters, filled from every trainer rank's
shared-memory payload by ``sp_core_sglang.refit.reshard_plan`` + ``commit``, equal the parameters the core's
Hugging Face loader gives that rank (the independent reference), bit for bit: tp 2 -> 1 and tp 1 -> 2, Qwen3
(one KV head: rows replicated at tp 2) and DeepSeek-V3 (MLA, TP-sharded experts). No sglang engine: the
server side's planning and copying run in the ranks; one 2-rank launch for every case."""
import os

import pytest
import torch

from sp_core.app.tiny import make_checkpoint
from support.multirank import run_ranks

MODELS = ("qwen3", "deepseek-v3")


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
    from sp_core_megatron.refit import layout, local_tensors, write_buckets

    wide, one = mpu.default_context(), mpu.single_rank()
    out = {}
    for name in MODELS:
        model_dir = os.path.join(root, name)
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as shm:
            trainer = load_model(model_dir, parallel=wide)  # tp 2 -> 1: both ranks train, rank 0 serves
            payload = dict(write_buckets(local_tensors(trainer), shm, 1 << 16), layout=layout(trainer))
            payloads = collectives.gather_objects_to_first(wide, payload)
            if wide.rank == 0:
                server, reference = load_model(model_dir, parallel=one), load_model(model_dir, parallel=one)
                _server_fill(server, payloads)
                out[f"{name} 2->1"] = _mismatches(server, reference)
            collectives.barrier(wide)
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as shm:
            # tp 1 -> 2: rank 0 trains alone (its payload is written once), both ranks serve
            payload = None
            if wide.rank == 0:
                trainer = load_model(model_dir, parallel=one)
                payload = dict(write_buckets(local_tensors(trainer), shm, 1 << 16), layout=layout(trainer))
            payloads = [collectives.broadcast_object(wide, payload)]
            server, reference = load_model(model_dir, parallel=wide), load_model(model_dir, parallel=wide)
            _server_fill(server, payloads)
            out[f"{name} 1->2 rank {wide.rank}"] = _mismatches(server, reference)
            collectives.barrier(wide)
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    for name in MODELS:
        make_checkpoint(name, str(root / name))
    return run_ranks(2, _rank, str(root))


@pytest.mark.parametrize("name", MODELS)
def test_reshard_fills_every_parameter_exactly(result, name):
    rank0, rank1 = result
    assert rank0[f"{name} 2->1"] == []
    assert rank0[f"{name} 1->2 rank 0"] == [] and rank1[f"{name} 1->2 rank 1"] == []
