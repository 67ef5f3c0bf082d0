"""The refit's GPU transport (CUDA IPC), on one GPU: a Megatron trainer (SPCoreGPTModel, tp 1, NCCL, Megatron's DDP
and distributed optimizer: its parameters are views of one buffer) takes one optimizer step and refits a server
process that holds the core's model (``benchmarks.refit_gpu.CoreServer``: the sglang adapter's own server-side code,
``sp_core_sglang.refit_passes.refit_model``, without sglang, which cannot run on the GPU machines). The reference for
the served weights and logits is the trainer's own (another process); for a refused refit, what the server served
before it. Skipped without CUDA.

The trainer runs in a process of its own started with ``spawn`` (NCCL, one rank), not through
``sp_core.procs.launch``: on the GPU machines the launcher's fork server preloads megatron-core, whose import
calls ``torch.cuda.is_available()`` (megatron/core/dist_checkpointing/strategies/torch.py, module level), and a
rank forked from it cannot initialise CUDA ("Cannot re-initialize CUDA in forked subprocess")."""
import importlib.util
import os
import traceback

import pytest
import torch

from sp_core.app.tiny import make_checkpoint

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU"),
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is needed"),
    pytest.mark.timeout(600),
]

PROMPTS = [[1, 5, 9, 3, 4, 8, 2], [7, 3], [2, 8, 60, 11, 13]]


def _arrays(xs):
    return [torch.from_numpy(x) for x in xs]


def _freed_after_del(holder: list) -> int:
    """Device bytes freed by dropping the tensors in ``holder`` (0 if something still maps them)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    holder.clear()
    torch.cuda.synchronize()
    return before - torch.cuda.memory_allocated()


def _rank(model_dir, server):
    from sp_core.app.runtime import prompt_logprobs
    from sp_core_megatron.cli_engine import training
    from sp_core_megatron.cli_engine.engine import build_model
    from sp_core_megatron.refit import core_model, local_tensors, parallel_of, refit, send

    out = {}
    model = build_model(model_dir, 1, False)
    ddp, losses, _ = training.train(model, 1, distributed_optimizer=True)
    model.eval()
    core = core_model(model)
    tensors = local_tensors(ddp)
    out["tensors"], out["storages"] = len(tensors), len({t.untyped_storage().data_ptr() for _, t in tensors})
    out["served_before"] = server.logprobs(PROMPTS)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    r1 = refit(ddp, server, "v1")
    out["memory"] = (before, torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated())
    out["r1"] = vars(r1)
    out["own_bytes"] = sum(p.numel() * p.element_size() for p in core.parameters())
    # the reference: the trainer's weights copied, in this process, into the core's model built as the server's
    # (one rank, the core's own packed forward: the same code on the same GPU)
    from sp_core import mpu
    from sp_core.app.runtime import load_model

    reference = load_model(model_dir, dtype=torch.float32, parallel=mpu.single_rank())
    trained = dict(core.named_parameters())
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(trained[name])
        out["trainer_v1"] = [x.numpy() for x in prompt_logprobs(reference, PROMPTS)]
    del reference
    out["served_v1"] = server.logprobs(PROMPTS)
    served = server.parameters()
    out["params_differ"] = [n for n, p in core.named_parameters()
                            if not torch.equal(torch.from_numpy(served[n]), p.detach().float().cpu())]

    parallel, names = parallel_of(ddp), [n for n, _ in tensors]
    # a refit whose last tensor is a fresh copy (its own allocation): once the server answered, the trainer can
    # free it (the server dropped its mapping after the commit)
    copy = [t.clone() for n, t in tensors if n == names[-1]]
    r_copy = send(parallel, [(n, copy[0] if n == names[-1] else t) for n, t in tensors], server, "v1-copy")
    out["copy"] = (r_copy.success, r_copy.message, copy[0].numel() * copy[0].element_size(), _freed_after_del(copy))

    # a NaN: refused, the server serves v1 bitwise, and released its mapping of the refused payload
    bad = [tensors[-1][1].clone()]
    bad[0].view(-1)[0] = float("nan")
    refused = send(parallel, [(n, bad[0] if n == names[-1] else t) for n, t in tensors], server, "bad")
    out["refused"] = vars(refused)
    out["served_after_refused"] = server.logprobs(PROMPTS)
    out["freed_refused"] = (bad[0].numel() * bad[0].element_size(), _freed_after_del(bad))
    out["losses"] = losses
    return out


def _trainer(store: str, model_dir: str, server, conn) -> None:
    """One Megatron rank (NCCL, world 1), as sp_core.procs.launch starts one: device, process group, mpu."""
    try:
        import torch.distributed as dist

        from sp_core import mpu
        from sp_core.mpu import platform

        platform.set_device(0)
        dist.init_process_group(platform.backend(), init_method=f"file://{store}", rank=0, world_size=1)
        mpu.initialize(1, sequence_parallel=False)
        conn.send(("ok", _rank(model_dir, server)))
    except BaseException:  # noqa: BLE001 - the test reports it
        conn.send(("error", traceback.format_exc()))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import multiprocessing as mp

    from benchmarks.refit_gpu import CoreServer

    root = tmp_path_factory.mktemp("refit_cuda_ipc")
    model_dir = make_checkpoint("qwen3", str(root / "qwen3"))
    server = CoreServer.start(model_dir, torch.float32)
    ctx = mp.get_context("spawn")
    answer, child_end = ctx.Pipe(duplex=False)
    trainer = ctx.Process(target=_trainer, args=(os.path.join(root, "store"), model_dir, server, child_end), daemon=True)
    try:
        trainer.start()
        child_end.close()
        assert answer.poll(400), "the trainer did not answer in 400 s"
        status, value = answer.recv()
        assert status == "ok", value
        yield value
    finally:
        trainer.join(30)
        if trainer.is_alive():
            trainer.kill()
        server.stop()


def _bitwise(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))


def test_server_serves_the_trained_weights_bitwise(result):
    assert result["r1"]["success"], result["r1"]["message"]
    assert result["params_differ"] == []
    assert not _bitwise(result["served_before"], result["served_v1"])  # the step changed the weights
    assert _bitwise(result["served_v1"], result["trainer_v1"])


def test_handles_of_views_of_one_buffer(result):
    """Megatron's distributed optimizer keeps the parameters as views of one buffer: one handle serves many."""
    assert result["storages"] < result["tensors"]
    assert result["r1"]["buckets"] == result["storages"]


def test_nothing_staged_on_the_trainer(result):
    before, peak, after = result["memory"]
    assert peak == before and after == before
    assert result["r1"]["bytes_moved"] == result["own_bytes"] and result["r1"]["full_tensors"] == 0


def test_nan_refused_and_server_unchanged(result):
    refused = result["refused"]
    assert not refused["success"]
    assert refused["message"].startswith("refit refused by server rank 0") and "NaN or inf" in refused["message"]
    assert _bitwise(result["served_after_refused"], result["served_v1"])


def test_server_releases_its_mappings(result):
    success, message, nbytes, freed = result["copy"]
    assert success, message
    assert freed >= nbytes > 0
    nbytes, freed = result["freed_refused"]
    assert freed >= nbytes > 0
