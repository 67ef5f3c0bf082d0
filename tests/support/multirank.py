"""Run a test body on N local ranks (processes, gloo on CPU / NCCL on GPUs, a free port).

A failing rank's traceback is raised in pytest; a rank that raises ends the run at once (the other
ranks are killed rather than left waiting in a collective); a hang fails after ``timeout`` seconds.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = float(os.environ.get("SP_CORE_TEST_TIMEOUT", "240"))


class RankFailed(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, tp, sequence_parallel, fn, args, results):
    try:
        import torch
        import torch.distributed as dist

        from sp_core import mpu
        from sp_core.mpu import platform

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        if platform.device_type() != "cpu":
            platform.set_device(rank)
        dist.init_process_group(platform.backend(), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT))
        mpu.initialize(tp, sequence_parallel=sequence_parallel)
        out = fn(*args)
        buffer = io.BytesIO()  # torch.save, not shared-memory tensors: the rank exits before pytest reads
        torch.save(out, buffer)
        results.put((rank, True, buffer.getvalue()))
        mpu.destroy()
    except BaseException:  # noqa: BLE001 - every failure goes back to pytest
        results.put((rank, False, traceback.format_exc()))


def run_ranks(world: int, fn: Callable, *args, tp: int | None = None, sequence_parallel: bool = True,
              timeout: float = DEFAULT_TIMEOUT) -> List[Any]:
    """Run ``fn(*args)`` on ``world`` ranks with mpu initialised (tp = world by default).

    Returns the per-rank results in rank order.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "sp_core.mpu"])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, tp or world, sequence_parallel, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    outputs: dict = {}
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(outputs) < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, payload = results.get(timeout=max(0.1, min(left, 1.0)))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailed(f"rank {procs.index(dead[0])} died with exit code {dead[0].exitcode}")
                if left <= 0:
                    raise RankFailed(f"ranks {sorted(set(range(world)) - set(outputs))} did not finish "
                                     f"within {timeout:.0f} s (hung collective?)")
                continue
            if not ok:
                raise RankFailed(f"rank {rank} failed:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(world)]
