"""The refit's transports on CPU: the trainer side picks shared memory for CPU tensors (CUDA IPC for GPU tensors is
tests/test_refit_cuda_ipc.py, on a GPU), the server side reads either kind through one function and refuses in one
line what it cannot open; the sglang adapter's server-side refit runs without sglang (``refit_model``: the code
its TP workers run) and is all or nothing. The reference for the refitted weights is the trainer's own tensors."""
import os
import tempfile

import pytest
import torch

from sp_core.app.tiny import make_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sp_core import mpu
    from sp_core.app.runtime import load_model

    model_dir = make_checkpoint("qwen3", str(tmp_path_factory.mktemp("transport") / "qwen3"))
    trainer = load_model(model_dir, parallel=mpu.single_rank())
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.device))
    return trainer, lambda: load_model(model_dir, parallel=mpu.single_rank())


def _payload(tensors, directory, **extra):
    from sp_core.procs.shared_memory import write_buckets

    return dict(write_buckets(tensors, directory, 4096), **extra)


def test_send_picks_shared_memory_for_cpu_tensors():
    from sp_core import mpu
    from sp_core.models import ModelError
    from sp_core_megatron.refit import send

    seen = []
    answer = {"success": True, "message": ""}
    tensors = [("a", torch.arange(6.0).view(2, 3))]
    result = send(mpu.single_rank(), tensors, None, "v", load=lambda e, payloads, v: seen.append(payloads) or answer)
    assert result.success and result.bytes_moved == 24
    assert seen[0][0].get("kind", "shm") == "shm" and "files" in seen[0][0]
    for transport, expected in [("cuda_ipc", "shares GPU tensors"), ("nccl", "accepted: 'shm', 'cuda_ipc'")]:
        with pytest.raises(ModelError, match=expected) as err:
            send(mpu.single_rank(), tensors, None, "v", load=lambda *a: answer, transport=transport)
        assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="all on CUDA devices .* or all on the CPU"):
        send(mpu.single_rank(), tensors + [("b", torch.zeros(2, device="meta"))], None, "v", load=lambda *a: answer)


def test_reader_refuses_what_it_cannot_open():
    from sp_core.procs.refit_transport import map_payload
    from sp_core.procs.shared_memory import PayloadError

    ipc = {"kind": "cuda_ipc", "storages": [], "tensors": []}
    cases = [({"kind": "nvlink"}, "payload kind 'nvlink'; accepted"),
             (dict(ipc, producer=[os.getpid(), "GPU-0"]), "in the process that made it"),
             (dict(ipc, producer=[os.getpid() + 1, "GPU-0"]),
              "sees no CUDA device" if not torch.cuda.is_available() else "does not see")]
    for payload, expected in cases:
        with pytest.raises(PayloadError, match=expected) as err:
            map_payload(payload)
        assert "\n" not in str(err.value)


def test_scheduler_free_refit_is_all_or_nothing(models):
    from sp_core_sglang.refit_passes import refit_model
    from sp_core_sglang.refit_checks import RefitRefused

    trainer, fresh = models
    server = fresh()
    original = {n: p.detach().clone() for n, p in server.named_parameters()}
    good = [(n, p.detach()) for n, p in trainer.named_parameters()]
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as shm:
        nan = [(n, t.clone().fill_(float("nan")) if i == len(good) - 1 else t) for i, (n, t) in enumerate(good)]
        os.mkdir(os.path.join(shm, "nan"))
        with pytest.raises(RefitRefused, match="refit refused by server rank 0: lm_head.weight: holds NaN or inf"):
            refit_model(server, [_payload(nan, os.path.join(shm, "nan"))])
        assert all(torch.equal(p, original[n]) for n, p in server.named_parameters())
        assert server._sp_core_refit is None

        refit_model(server, [_payload(good, shm)])
    trained = dict(trainer.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in server.named_parameters())
    assert not all(torch.equal(p, original[n]) for n, p in server.named_parameters())


def test_reshard_of_cuda_ipc_payloads_refused(models):
    """A reshard reads every trainer payload on every server rank; a CUDA IPC handle has one reader."""
    from sp_core_sglang.refit_passes import refit_model
    from sp_core_sglang.refit_checks import RefitRefused

    _, fresh = models
    server = fresh()
    payloads = [{"kind": "cuda_ipc", "producer": [os.getpid() + 1, "GPU-0"], "storages": [], "tensors": [],
                 "layout": {"tp": 2, "rank": r, "moe_parallel": None, "pieces": {}}} for r in range(2)]
    with pytest.raises(RefitRefused, match="CUDA IPC handles have one reader each: refit with transport='shm'"):
        refit_model(server, payloads)
