"""Refit time on one GPU, trainer and server in two processes: CUDA IPC (the GPU transport), against what a user
could pick instead on the same machine -- the host shared-memory transport (/dev/shm) and the disk (export a
Hugging Face checkpoint, load it into the server's model: the status quo, engine restart not counted).

    python -m benchmarks.refit_gpu --out $OUT                   # Qwen3-8B shapes, bf16, tp 1, random weights
    python -m benchmarks.refit_gpu --layers 2 --repeats 2 --disk-repeats 1   # a quick check

The trainer is the core's ``CausalLM`` in this process; the server (``CoreServer``) is another process holding
the core's ``CausalLM`` on the same GPU and running the sglang adapter's own server-side code
(``sp_core_sglang.refit_passes.refit_model``: map, check every tensor, agree, copy) -- sglang itself cannot run on
the GPU machines. Seconds are the trainer's, from its first action to the server's answer (``RefitResult.seconds``).
``CoreServer`` also serves tests/test_refit_cuda_ipc.py.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import tempfile
import time
import traceback

import torch

from benchmarks.common import QWEN3_TINY, SHAPE, header, qwen3_config, save_results, tee_log

SHAPES = {"qwen3-8b": SHAPE, "tiny": QWEN3_TINY}  # --shape tiny: a quick check of the harness (CPU too)


class CoreServer:
    """The handle (picklable) of a process that holds the core's ``CausalLM`` on this GPU and serves refits with
    ``sp_core_sglang.refit_passes.refit_model`` -- what the adapter's sglang workers run, without sglang. Requests go
    over a Unix socket, one connection each."""

    def __init__(self, address: str, authkey: bytes):
        self.address, self.authkey, self.process = address, authkey, None

    def __getstate__(self):
        return {"address": self.address, "authkey": self.authkey, "process": None}

    @classmethod
    def start(cls, model, dtype: torch.dtype = torch.bfloat16, timeout: float = 600) -> "CoreServer":
        """``model``: a checkpoint directory (loaded), or (layers, shape) of a random-weight Qwen3 (``random_model``)."""
        import multiprocessing as mp

        directory = tempfile.mkdtemp(prefix="sp-core-server-")
        server = cls(os.path.join(directory, "socket"), secrets.token_bytes(16))
        ctx = mp.get_context("spawn")
        ready, child_end = ctx.Pipe(duplex=False)
        server.process = ctx.Process(target=_serve, args=(server.address, server.authkey, model, dtype, child_end),
                                     daemon=True)
        server.process.start()
        child_end.close()
        if not ready.poll(timeout):
            server.process.kill()
            raise RuntimeError(f"the refit server did not start within {timeout} s")
        status = ready.recv()
        if status != "ready":
            raise RuntimeError(f"the refit server failed to start: {status}")
        return server

    def call(self, *request):
        from multiprocessing.connection import Client

        with Client(self.address, family="AF_UNIX", authkey=self.authkey) as conn:
            conn.send(request)
            status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"refit server: {value}")
        return value

    def refit(self, payloads, weight_version):
        """``sp_core_megatron.refit``'s engine interface: {"success", "message", "seconds"}."""
        return self.call("refit", payloads, weight_version)

    def logprobs(self, prompts):
        """The server model's log-probabilities at every position of every prompt (float32 numpy arrays)."""
        return self.call("logprobs", prompts)

    def parameters(self):
        """Every parameter of the server's model, as float32 numpy arrays (small models only)."""
        return self.call("parameters")

    def checksums(self):
        """Per parameter, the sum of its bits read as 16-bit integers (an exact integer fingerprint)."""
        return self.call("checksums")

    def load_checkpoint(self, model_dir: str) -> float:
        """Load a Hugging Face checkpoint into the server's model; the server's seconds."""
        return self.call("load", model_dir)

    def stop(self) -> None:
        try:
            self.call("stop")
        except (OSError, EOFError, RuntimeError):
            pass
        if self.process is not None:
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
        shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)


def fingerprints(model) -> list:
    """``CoreServer.checksums`` of a model in this process."""
    return [int(p.detach().view(torch.int16).sum(dtype=torch.int64)) if p.element_size() == 2 else
            int(p.detach().view(torch.int32).sum(dtype=torch.int64)) for _, p in sorted(model.named_parameters())]


def random_model(layers: int, dtype: torch.dtype, seed: int, shape: dict = SHAPE):
    """The core's ``CausalLM`` of ``shape`` (Qwen3-8B's) with ``layers`` layers and random weights, on this device,
    one rank."""
    from sp_core import mpu
    from sp_core.models import CausalLM
    from sp_core.mpu import platform

    cfg = qwen3_config(layers, dict(shape, tie_word_embeddings=False))
    with torch.device(platform.current_device()):
        model = CausalLM(cfg, dtype=dtype, parallel=mpu.single_rank())
    gen = torch.Generator(device=platform.current_device()).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    return model.eval()


def _serve(address, authkey, model, dtype, ready) -> None:
    from multiprocessing.connection import Listener

    from sp_core import mpu
    from sp_core.app.runtime import load_model, prompt_logprobs
    from sp_core.models import load_hf_checkpoint
    from sp_core.mpu import platform
    from sp_core_sglang.refit_checks import RefitRefused
    from sp_core_sglang.refit_passes import commit, stage_model

    try:
        model = (load_model(model, dtype=dtype, parallel=mpu.single_rank()) if isinstance(model, str)
                 else random_model(model[0], dtype, seed=1, shape=model[1]))
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
    except Exception as err:
        ready.send(f"{type(err).__name__}: {err}")
        return
    ready.send("ready")
    while True:
        with listener.accept() as conn:
            request = conn.recv()
            try:
                if request[0] == "stop":
                    conn.send(("ok", None))
                    return
                if request[0] == "refit":
                    start = time.perf_counter()
                    token = secrets.randbits(62)
                    try:  # refit_model's two steps, timed apart
                        stage_model(model, token, request[1])
                        staged = time.perf_counter()
                        commit(model, token)
                        answer = {"success": True, "message": "", "stage_seconds": staged - start,
                                  "commit_seconds": time.perf_counter() - staged}
                    except RefitRefused as err:
                        answer = {"success": False, "message": str(err)}
                    conn.send(("ok", dict(answer, seconds=time.perf_counter() - start)))
                elif request[0] == "logprobs":
                    with torch.no_grad():
                        conn.send(("ok", [x.numpy() for x in prompt_logprobs(model, request[1])]))
                elif request[0] == "parameters":
                    conn.send(("ok", {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters()}))
                elif request[0] == "checksums":
                    conn.send(("ok", fingerprints(model)))
                elif request[0] == "load":
                    start = time.perf_counter()
                    load_hf_checkpoint(model, request[1])
                    platform.synchronize()
                    conn.send(("ok", time.perf_counter() - start))
                else:
                    conn.send(("error", f"unknown request {request[0]!r}"))
            except Exception as err:
                conn.send(("error", f"{type(err).__name__}: {err} | {traceback.format_exc()[-2000:]}"))


# -- the benchmark ---------------------------------------------------------------------------------------------

def _send(trainer, server, version, transport):
    from sp_core_megatron.refit import local_tensors, send

    result = send(trainer.parallel, local_tensors(trainer), server, version, transport=transport)
    if not result.success:
        raise RuntimeError(f"{transport} refit refused: {result.message}")
    return result


def _ipc_or_shm(trainer, server, transport, repeats, log):
    from sp_core.mpu import platform

    rows = []
    for i in range(repeats):
        platform.synchronize()
        platform.reset_peak_memory()
        before = platform.max_memory_allocated()  # = allocated now
        result = _send(trainer, server, f"{transport}-{i}", transport)
        rows.append({"seconds": result.seconds, "server_seconds": result.answer.get("seconds"),
                     "server_stage_seconds": result.answer.get("stage_seconds"),
                     "server_commit_seconds": result.answer.get("commit_seconds"),
                     "bytes": result.bytes_moved, "handles_or_buckets": result.buckets,
                     "trainer_peak_growth": platform.max_memory_allocated() - before})
        log(f"{transport} {i}: {result.seconds:.3f} s (server {rows[-1]['server_seconds']:.3f} s: map + check "
            f"{rows[-1]['server_stage_seconds']:.3f} s, copy {rows[-1]['server_commit_seconds']:.3f} s)")
    return rows


def _disk(trainer, server, repeats, root, log):
    from sp_core.models.checkpoint import save_hf_checkpoint
    from sp_core.mpu import platform

    rows = []
    for i in range(repeats):
        out = os.path.join(root, f"export-{i}")
        platform.synchronize()
        start = time.perf_counter()
        save_hf_checkpoint(trainer, out)
        saved = time.perf_counter()
        server.load_checkpoint(out)
        done = time.perf_counter()
        rows.append({"seconds": done - start, "export_seconds": saved - start, "load_seconds": done - saved})
        log(f"disk {i}: {done - start:.3f} s (export {saved - start:.3f} s, load {done - saved:.3f} s)")
        shutil.rmtree(out, ignore_errors=True)
    return rows


def _summary(name, rows, nbytes):
    seconds = statistics.median(r["seconds"] for r in rows)
    return {"method": name, "repeats": len(rows), "median_seconds": seconds, "gb_per_s": nbytes / seconds / 1e9,
            "rows": rows}


def measure(layers: int, shape: str, repeats: int, disk_repeats: int, disk_root: str, log,
            transports=("cuda_ipc", "shm", "disk")) -> dict:
    from benchmarks.common import device_name
    from sp_core.mpu import platform

    trainer = random_model(layers, torch.bfloat16, seed=2, shape=SHAPES[shape])
    nbytes = sum(p.numel() * p.element_size() for p in trainer.parameters())
    log(f"trainer: {layers} layers of {shape}, {nbytes / 1e9:.2f} GB of bf16 parameters on {device_name()}")
    server = CoreServer.start((layers, SHAPES[shape]))
    results = {"layers": layers, "shape": shape, "bytes": nbytes, "tensors": len(list(trainer.parameters())),
               "methods": []}
    try:
        if platform.device_type() == "cuda" and "cuda_ipc" in transports:
            reference = fingerprints(trainer)
            rows = _ipc_or_shm(trainer, server, "cuda_ipc", repeats, log)
            results["methods"].append(dict(_summary("cuda_ipc", rows, nbytes), bitwise=server.checksums() == reference))
        shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
        results["dev_shm"] = {"total": shm.total, "free": shm.free} if shm else None
        log(f"/dev/shm: {results['dev_shm']}")
        if "shm" not in transports:
            pass
        elif shm is not None and shm.free > nbytes * 1.05:
            with torch.no_grad():  # new weights, so that the server's copy must change again
                for p in trainer.parameters():
                    p.neg_()
            results["methods"].append(_summary("shm", _ipc_or_shm(trainer, server, "shm", repeats, log), nbytes))
            results["methods"][-1]["bitwise"] = server.checksums() == fingerprints(trainer)
        else:
            results["methods"].append({"method": "shm", "skipped": f"/dev/shm has {shm and shm.free} bytes free, "
                                                                     f"the refit needs {nbytes}"})
        if disk_repeats and "disk" in transports:
            with torch.no_grad():
                for p in trainer.parameters():
                    p.neg_()
            os.makedirs(disk_root, exist_ok=True)
            root = tempfile.mkdtemp(dir=disk_root)
            try:
                results["methods"].append(_summary("disk", _disk(trainer, server, disk_repeats, root, log), nbytes))
                results["methods"][-1]["bitwise"] = server.checksums() == fingerprints(trainer)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        server.stop()
    return results


def markdown(results: dict) -> str:
    lines = [f"{results['device']}, {results['date']}: `{results['command']}`", "",
             f"{results['layers']} layers, {results['bytes'] / 1e9:.2f} GB of bf16 parameters ({results['tensors']} "
             f"tensors), tp 1, trainer and server on the same GPU", "",
             "| transport | median seconds | GB/s | repeats | server equal to the trainer (bitwise) | of which (medians) |",
             "|---|---|---|---|---|---|"]
    for m in results["methods"]:
        if "skipped" in m:
            lines.append(f"| {m['method']} | skipped: {m['skipped']} | | | | |")
        else:
            lines.append(f"| {m['method']} | {m['median_seconds']:.3f} | {m['gb_per_s']:.1f} | {m['repeats']} | "
                         f"{'yes' if m.get('bitwise') else 'NO'} | {_parts(m['rows'])} |")
    return "\n".join(lines) + "\n"


def _parts(rows) -> str:
    def median(key):
        return statistics.median(r[key] for r in rows)

    if "export_seconds" in rows[0]:
        return f"export {median('export_seconds'):.3f} s, load {median('load_seconds'):.3f} s"
    return (f"server: map + check {median('server_stage_seconds'):.3f} s, copy {median('server_commit_seconds'):.3f} s; "
            f"trainer's device memory grew by {max(r['trainer_peak_growth'] for r in rows)} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--repeats", type=int, default=5, help="refits per in-memory transport (median)")
    parser.add_argument("--disk-repeats", type=int, default=3, help="export + load rounds (0: skip the disk path)")
    parser.add_argument("--disk-dir", default="out/refit-disk", help="where the checkpoints are written (not /dev/shm)")
    parser.add_argument("--transports", default="cuda_ipc,shm,disk", help="a comma-separated subset")
    parser.add_argument("--out", default="out/refit_gpu")
    args = parser.parse_args()
    log = tee_log(args.out)
    results = dict(header(), **measure(args.layers, args.shape, args.repeats, args.disk_repeats, args.disk_dir, log,
                                          tuple(args.transports.split(","))))
    save_results(args.out, results, markdown(results), name="refit_gpu")
    print(markdown(results))


if __name__ == "__main__":
    main()
