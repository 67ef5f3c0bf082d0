"""Start N local ranks (one process each: gloo on CPU, NCCL/HCCL with one device per rank) and run a
function on every one with sp_core.mpu initialised.

- A rank that raises ends the run at once with that rank's error (the others are killed, not left
  waiting in a collective). A rank that dies without a word (a signal, the OOM killer) is named with
  its signal or exit code and what it was doing.
- Hangs: a rank that waits in one collective for ``SP_CORE_COLLECTIVE_TIMEOUT`` seconds (default
  600, Megatron's default distributed timeout) fails the run, naming the rank, the collective and what
  the other ranks are doing. A long run that keeps making progress is never stopped.
- Ranks die with the process that launched them: each rank watches that process and exits (removing
  what it registered with ``remove_on_abort``) as soon as it is gone, however it died. The fork server
  and resource tracker then exit on their own (their pipes close).
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import select
import shutil
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_sentinels
from typing import Any, Callable, List, Optional

import torch
import torch.multiprocessing as mp

from sp_core import settings
from sp_core.procs import terminal
from sp_core.mpu import activity

COLLECTIVE_TIMEOUT_ENV = "SP_CORE_COLLECTIVE_TIMEOUT"
# after the parent's detector: a collective outside sp_core.mpu (Megatron's) still fails in the rank
_BACKSTOP = 30.0


class RankFailed(AssertionError):
    """A rank raised, died or hung. ``error_type`` / ``error_message``: the rank's exception (empty when
    it died without one), ``details`` its traceback, ``rank`` the rank that caused the failure."""

    def __init__(self, message: str, error_type: str = "", error_message: str = "", details: str = "",
                 rank: Optional[int] = None):
        super().__init__(message)
        self.error_type, self.error_message, self.details, self.rank = error_type, error_message, details, rank


_RESULTS = None  # in a rank: the queue back to the parent
_ABORT_PATHS: List[str] = []


def progress(line: str) -> None:
    """From a rank: have the parent print ``line`` on its stderr now (ranks' own streams may belong to a
    long-lived fork server, not to the command that is running)."""
    if _RESULTS is None:
        terminal.say(line)
    else:
        _RESULTS.put((-1, "progress", line))


def remove_on_abort(path: str) -> None:
    """In a rank: remove ``path`` (a partial output) if the run is aborted before the rank ends: by the rank
    itself if the launching process dies, by the launching process if it stops the ranks (a signal, another
    rank's failure), which kills them with no chance to clean up. Register before creating ``path``: a rank
    killed right after creating it then leaves nothing the launcher does not know of."""
    _ABORT_PATHS.append(path)
    activity.note_partial_paths(_ABORT_PATHS)


def forget_on_abort(path: str) -> None:
    """In a rank: ``path`` (registered with ``remove_on_abort``) is gone or complete; no longer removed on abort."""
    if path in _ABORT_PATHS:
        _ABORT_PATHS.remove(path)
        activity.note_partial_paths(_ABORT_PATHS)


def new_partial_dir(target: str) -> str:
    """A new empty directory next to ``target`` for writing it atomically (``.NAME.partial-PID-XXXXXXXX``),
    registered with ``remove_on_abort`` before it exists."""
    import secrets

    parent, name = os.path.dirname(os.path.abspath(target)), os.path.basename(os.path.abspath(target))
    while True:
        path = os.path.join(parent, f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        remove_on_abort(path)  # a name taken already belongs to a dead process with this pid: stale too
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def _die_with(parent_pid: int) -> None:
    """Block until ``parent_pid`` exits, then remove partial outputs and end this rank."""
    try:
        fd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        fd = None
    except (AttributeError, OSError):  # no pidfd (old kernel): poll
        while _alive(parent_pid):
            time.sleep(0.5)
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    for path in _ABORT_PATHS:
        shutil.rmtree(path, ignore_errors=True)
    os._exit(128 + signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _entry(rank, world, port, tp, cp, sequence_parallel, timeout, fn, args, results, board, parent_pid):
    # port: of the rendezvous store the parent holds open (no race for a free port)
    global _RESULTS
    _RESULTS = results
    threading.Thread(target=_die_with, args=(parent_pid,), daemon=True, name="sp-core-parent-watch").start()
    activity.attach(board, rank)
    try:
        import torch.distributed as dist

        from sp_core import mpu
        from sp_core.mpu import platform

        activity.doing("joining the process group")
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
        mpu.initialize(tp, sequence_parallel=sequence_parallel, cp_size=cp)
        activity.doing(f"running {getattr(fn, '__name__', 'the function')}")
        out = fn(*args)
        activity.enter_collective("the barrier after the function")
        try:
            dist.barrier()  # rank 0 hosts the rendezvous store: no rank may tear it down while others use it
        finally:
            activity.leave_collective()
        activity.doing("returning its result")
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


def describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


class _Run:
    """The parent's view of one launch: processes, the activity board, and the failure to report."""

    def __init__(self, procs, board, hang_timeout: float):
        self.procs, self.board, self.hang_timeout = procs, board, hang_timeout
        self.reported: set = set()  # ranks that sent a result or an error

    def others(self, rank: int) -> str:
        return "; ".join(f"rank {r}: {self.board.text(r)}" for r in range(len(self.procs)) if r != rank)

    def dead_rank(self) -> Optional[RankFailed]:
        for rank, proc in enumerate(self.procs):
            if rank not in self.reported and proc.exitcode not in (None, 0):
                msg = (f"rank {rank} {describe_exit(proc.exitcode)} while {self.board.text(rank)}"
                       + (f" ({self.others(rank)})" if len(self.procs) > 1 else ""))
                return RankFailed(msg, rank=rank)
        return None

    def hung_rank(self) -> Optional[RankFailed]:
        now = time.time()
        for rank in range(len(self.procs)):
            since = self.board.waiting_since(rank)
            if since and now - since > self.hang_timeout:
                return RankFailed(
                    f"rank {rank}: no progress for {now - since:.0f} s {self.board.text(rank)} "
                    f"({self.others(rank)}); a hung collective? The limit is {COLLECTIVE_TIMEOUT_ENV}="
                    f"{self.hang_timeout:g} s", rank=rank)
        return None

    def root_cause(self, rank: int, error: RankFailed) -> RankFailed:
        """A rank's error may only echo a peer that died (gloo: 'Connection reset by peer'): give the
        peers a moment to be reaped and blame a dead one first."""
        wait_sentinels([p.sentinel for r, p in enumerate(self.procs) if r != rank], timeout=1.0)
        dead = self.dead_rank()
        if dead is None:
            return error
        dead.args = (f"{dead.args[0]}; then rank {rank} failed: {error.error_message.splitlines()[0][:200]}",)
        return dead


def run_ranks(world: int, fn: Callable, *args, tp: Optional[int] = None, sequence_parallel: bool = True,
              timeout: Optional[float] = None, hang_timeout: Optional[float] = None, cp: int = 1) -> List[Any]:
    """Run ``fn(*args)`` on ``world`` ranks (tp = world / cp by default; ranks = cp x tp, TP innermost, the
    rest data-parallel); per-rank results in rank order.

    ``hang_timeout``: seconds a rank may wait in one collective (default: SP_CORE_COLLECTIVE_TIMEOUT).
    ``timeout``: an optional limit on the whole run (tests use one as a safety net; the CLI none).
    """
    hang_timeout = settings.current().collective_timeout if hang_timeout is None else hang_timeout
    # The fork server imports _PRELOAD; megatron-core's import asks torch whether CUDA is available, which would
    # initialise CUDA there, and no rank forked from it could ("Cannot re-initialize CUDA in forked subprocess").
    # NVML answers the question without initialising CUDA; the fork server inherits this environment.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    results = ctx.Queue()
    board = activity.Board(ctx, world)
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_entry, args=(r, world, port, tp or world // cp, cp, sequence_parallel,
                                              hang_timeout + _BACKSTOP, fn, args, results, board, os.getpid()))
             for r in range(world)]
    run = _Run(procs, board, hang_timeout)
    outputs: dict = {}
    finished = False
    try:
        for p in procs:
            p.start()
        deadline = None if timeout is None else time.time() + timeout
        while len(outputs) < world:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                failure = run.dead_rank() or run.hung_rank()
                if failure is not None:
                    raise failure
                if deadline is not None and time.time() > deadline:
                    raise RankFailed(f"ranks {sorted(set(range(world)) - set(outputs))} did not finish within "
                                     f"{timeout:.0f} s ({run.others(-1)})")
                continue
            if ok == "progress":
                terminal.say(payload)
                continue
            run.reported.add(rank)
            if not ok:
                error_type, message, details = payload
                raise run.root_cause(rank, RankFailed(f"rank {rank} failed:\n{details}", error_type, message,
                                                      details, rank=rank))
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        finished = True
    finally:
        for p in procs:
            if finished:
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join()
        if not finished:  # killed ranks cannot remove their partial outputs: do it for them
            for rank in range(world):
                for path in board.partial_paths(rank):
                    shutil.rmtree(path, ignore_errors=True)
    return [outputs[r] for r in range(world)]
