"""Start N local ranks (one process each: gloo on CPU, NCCL/HCCL with one device per rank) and run a
function on every one with sp_core.mpu initialised.

A rank that raises ends the run at once with that rank's error (the others are killed, not left
waiting in a collective); a run that outlives ``timeout`` seconds fails instead of hanging.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import sys
import traceback
from typing import Any, Callable, List, Optional

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = float(os.environ.get("SP_CORE_RANK_TIMEOUT", "600"))


class RankFailed(AssertionError):
    """A rank raised. ``error_type`` / ``error_message``: the rank's exception, ``details`` its traceback."""

    def __init__(self, message: str, error_type: str = "", error_message: str = "", details: str = ""):
        super().__init__(message)
        self.error_type, self.error_message, self.details = error_type, error_message, details


_RESULTS = None  # in a rank: the queue back to the parent


def progress(line: str) -> None:
    """From a rank: have the parent print ``line`` on its stderr now (ranks' own streams may belong to a
    long-lived fork server, not to the command that is running)."""
    if _RESULTS is None:
        print(line, file=sys.stderr, flush=True)
    else:
        _RESULTS.put((-1, "progress", line))


def _entry(rank, world, port, tp, sequence_parallel, timeout, fn, args, results):
    # port: of the rendezvous store the parent holds open (no race for a free port)
    global _RESULTS
    _RESULTS = results
    try:
        import torch.distributed as dist

        from sp_core import mpu
        from sp_core.mpu import platform

        if platform.device_type() == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        else:
            platform.set_device(rank)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(platform.backend(), store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        mpu.initialize(tp, sequence_parallel=sequence_parallel)
        out = fn(*args)
        dist.barrier()  # rank 0 hosts the rendezvous store: no rank may tear it down while others still use it
        buffer = io.BytesIO()  # torch.save, not shared-memory tensors: the rank may exit before we read
        torch.save(out, buffer)
        results.put((rank, True, buffer.getvalue()))
        mpu.destroy()
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, (type(err).__name__, str(err), traceback.format_exc())))


_PRELOAD = ["torch", "sp_core.mpu"]


def add_preload(module: str) -> None:
    """Import ``module`` once in the fork server rather than in every rank (effective before the first
    run; an engine module calls it at import, e.g. for megatron.core)."""
    if module not in _PRELOAD:
        _PRELOAD.append(module)


def run_ranks(world: int, fn: Callable, *args, tp: Optional[int] = None, sequence_parallel: bool = True,
              timeout: float = DEFAULT_TIMEOUT) -> List[Any]:
    """Run ``fn(*args)`` on ``world`` ranks (tp = world by default); per-rank results in rank order."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    results = ctx.Queue()
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_entry, args=(r, world, port, tp or world, sequence_parallel, timeout, fn, args,
                                              results)) for r in range(world)]
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
            if ok == "progress":
                print(payload, file=sys.stderr, flush=True)
                continue
            if not ok:
                error_type, message, details = payload
                raise RankFailed(f"rank {rank} failed:\n{details}", error_type, message, details)
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(world)]
