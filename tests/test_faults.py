"""Faults of a multi-rank run: a hung collective, a killed rank, a killed launcher. Each ends in bounded
time with a message that names what happened, and leaves no process behind."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sp_core.procs.launch import RankFailed, run_ranks
from support.checkpoints import make_checkpoint

pytestmark = pytest.mark.timeout(240)


def _hang():
    from sp_core import mpu
    from sp_core.mpu import collectives

    if mpu.default_context().rank == 1:
        time.sleep(60)  # never joins the all-reduce
    collectives.all_reduce(mpu.default_context(), torch.ones(3, 4))


def _busy_but_progressing(steps):
    from sp_core import mpu
    from sp_core.mpu import collectives

    total = torch.zeros(1)
    for _ in range(steps):  # a count, not a clock: every rank issues the same collectives
        total += collectives.all_reduce(mpu.default_context(), torch.ones(1))
        time.sleep(0.05)
    return total.item() == 2 * steps


def test_hung_collective_fails_naming_rank_and_collective():
    with pytest.raises(RankFailed) as info:
        run_ranks(2, _hang, hang_timeout=2, timeout=120)
    message = str(info.value)
    assert "rank 0: no progress for" in message and "in all_reduce (3, 4)" in message, message
    assert "rank 1: running _hang" in message and "SP_CORE_COLLECTIVE_TIMEOUT=2" in message, message


def test_long_run_that_progresses_is_not_a_hang():
    """The limit is per collective, not per run: over 4 s of steady collectives under a 2 s limit pass."""
    assert run_ranks(2, _busy_but_progressing, 80, hang_timeout=2, timeout=120) == [True, True]


def _every_collective_then_compute(form, seconds):
    """Each public collective of ``collectives`` once (every fused form through ``form``), then compute
    that issues none for longer than the hang limit. Returns the collectives this rank called."""
    import inspect

    import dataclasses

    from sp_core import mpu
    from sp_core.mpu import activity, collectives as c

    p = mpu.default_context()
    p = p.replace(settings=dataclasses.replace(p.settings, async_tp=form))
    rank_order = p.replace(deterministic=True)  # the deterministic mode's route
    x, w = torch.ones(4, 3), torch.ones(3, 2)
    calls = {
        "all_reduce": lambda: (c.all_reduce(p, x), c.all_reduce(p, x, op="max"), c.all_reduce(rank_order, x),
                               c.all_reduce(rank_order, x, op="max")),
        "all_gather": lambda: (c.all_gather(p, x), c.all_gather(rank_order, x)),
        "all_gather_start": lambda: (c.all_gather_start(p, x).wait(), c.all_gather_start(rank_order, x).wait()),
        "reduce_scatter": lambda: (c.reduce_scatter(p, x), c.reduce_scatter(rank_order, x)),
        "reduce_scatter_start": lambda: (c.reduce_scatter_start(p, x).wait(),
                                         c.reduce_scatter_start(rank_order, x).wait()),
        "gather_to_first": lambda: c.gather_to_first(p, x),
        "all_gather_packed": lambda: c.all_gather_packed(p, [x, x.int()]),
        "all_to_all": lambda: c.all_to_all(p, x, [2, 2], [2, 2]),
        "broadcast_object": lambda: c.broadcast_object(p, {"a": 1}),
        "gather_objects_to_first": lambda: c.gather_objects_to_first(p, {"a": 1}),
        "all_gather_objects_over": lambda: c.all_gather_objects_over(p.group, {"a": 1}),
        "barrier": lambda: c.barrier(p),
        "all_gather_matmul": lambda: c.all_gather_matmul(p, x, w),
        "matmul_reduce_scatter": lambda: c.matmul_reduce_scatter(p, x, w),
        "matmul_reduce_scatter_start": lambda: c.matmul_reduce_scatter_start(p, x, w).wait(),
        "mean_over_group": lambda: c.mean_over_group(p, x, None),
    }
    for call in calls.values():
        call()
    depth = activity._DEPTH
    time.sleep(seconds)
    public = {name for name, f in vars(c).items() if inspect.isfunction(f) and f.__module__ == c.__name__
              and not name.startswith("_") and name not in ("counts", "counting", "split")}
    return sorted(public - set(calls)), depth


@pytest.mark.parametrize("form", ["off", "ring", "split"])
def test_every_collective_leaves_the_activity_board(form):
    """A rank that computes after any collective (all_to_all and gather_to_first once never left the board)
    is not taken for hung: 3 s of compute under a 1.5 s limit pass, with every collective called."""
    results = run_ranks(2, _every_collective_then_compute, form, 3.0, hang_timeout=1.5, timeout=120)
    assert results == [([], 0), ([], 0)], f"public collectives not exercised, and the board's depth: {results}"


# --- the real command, killed from outside --------------------------------------------------------

def _session_processes(sid):
    """Live (non-zombie) processes of session ``sid``: pid -> (ppid, command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(entry)] = (int(fields[1]), cmd)
    return found


def _ranks(sid, parent):
    procs = _session_processes(sid)
    servers = [pid for pid, (ppid, cmd) in procs.items() if ppid == parent and "forkserver" in cmd]
    return [pid for pid, (ppid, _) in procs.items() if ppid in servers]


def _wait_until_gone(sid, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = _session_processes(sid)
        if not left:
            return {}
        time.sleep(0.2)
    return _session_processes(sid)


@pytest.fixture(scope="module")
def train_ckpt(tmp_path_factory):
    return make_checkpoint("qwen3-train", str(tmp_path_factory.mktemp("faults") / "m"))


def _start_training(model, out):
    """`sp-core train --tp 2` for (practically) ever, in its own session; returns once step 1 is done."""
    proc = subprocess.Popen([sys.executable, "-m", "sp_core.app.cli", "train", "--model", model, "--out", out,
                             "--tp", "2", "--steps", "100000", "--seq-length", "8"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("step 1/"):
            return proc, lines
    proc.wait()
    pytest.fail("training ended before step 1:\n" + "".join(lines))


def test_killed_launcher_takes_its_ranks_along(train_ckpt, tmp_path):
    """SIGKILL (timeout, Slurm, the OOM killer) of `sp-core train --tp 2`: within 10 s no rank, fork
    server or resource tracker is left, and --out is never written."""
    out = tmp_path / "trained"
    proc, _ = _start_training(train_ckpt, str(out))
    assert len(_ranks(proc.pid, proc.pid)) == 2
    proc.kill()
    proc.wait()
    left = _wait_until_gone(proc.pid)
    for pid in left:  # clean up before failing, so a failure leaves nothing either
        os.kill(pid, signal.SIGKILL)
    assert not left, left
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".trained")]


def _collectives_forever(pid_dir):
    from sp_core import mpu
    from sp_core.mpu import collectives

    with open(os.path.join(pid_dir, str(mpu.default_context().rank)), "w") as f:
        f.write(str(os.getpid()))
    while True:
        collectives.all_reduce(mpu.default_context(), torch.ones(4, 8))


def test_killed_rank_is_named_with_its_signal_and_activity(tmp_path):
    """SIGKILL one rank of a tp 2 run: the error names that rank (not the survivor's 'connection reset'),
    its signal and what it was doing; no rank is left."""
    import threading

    def kill_rank_1():
        while not (tmp_path / "1").exists() or not (tmp_path / "1").read_text():
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(int((tmp_path / "1").read_text()), signal.SIGKILL)

    threading.Thread(target=kill_rank_1, daemon=True).start()
    with pytest.raises(RankFailed) as info:
        run_ranks(2, _collectives_forever, str(tmp_path), timeout=120)
    message = str(info.value)
    assert info.value.rank == 1 and message.startswith("rank 1 was killed by SIGKILL while "), message
    assert "all_reduce (4, 8)" in message and "rank 0: " in message, message
    for rank in (0, 1):
        pid = int((tmp_path / str(rank)).read_text())
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def _export_with_a_late_rank(model_dir, out_dir):
    """The real export (save_hf_checkpoint) with rank 1 late: rank 0 has made the partial directory and waits
    in the gather of the first tensor when the launcher is stopped."""
    from sp_core import mpu
    from sp_core.app.runtime import load_model
    from sp_core.models import save_hf_checkpoint

    model = load_model(model_dir, torch.float32)
    if mpu.default_context().rank == 1:
        time.sleep(120)
    save_hf_checkpoint(model, out_dir)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_export_leaves_no_partial_output(train_ckpt, tmp_path, signum):
    """SIGTERM / SIGINT to the launcher while a rank exports: the launcher kills the ranks (which cannot clean
    up) and removes the partial directory they registered (before: an empty `.NAME.partial-XXXX` stayed,
    `sp-core train` 3 tries in 4)."""
    import threading

    from sp_core.app import cli

    out = tmp_path / "out" / "trained"
    out.parent.mkdir()

    def signal_once_partial():
        deadline = time.time() + 200
        while not any(p.startswith(".trained.partial-") for p in os.listdir(out.parent)) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    previous = signal.signal(signal.SIGTERM, cli._on_sigterm)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under nohup
    try:
        threading.Thread(target=signal_once_partial, daemon=True).start()
        with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else cli._Terminated):
            run_ranks(2, _export_with_a_late_rank, train_ckpt, str(out), timeout=200)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    assert os.listdir(out.parent) == [], os.listdir(out.parent)


# --- sglang's engine: its processes end with the command, and so does its scratch space ---------------

_needs_sglang = pytest.mark.skipif(__import__("importlib").util.find_spec("sglang") is None,
                                   reason="sglang is not installed")


def _sigint_as_in_a_terminal() -> None:
    """A suite started in the background (``nohup``, ``&`` without job control) ignores SIGINT, and so would the
    command it starts (the CLI keeps an ignored SIGINT ignored, as a program under nohup must)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_sglang(model, tmp_path, until):
    """`sp-core logits --engine sglang --tp 2` in its own session, <tmp> = tmp_path/tmp; returns once
    ``until(processes of the session but the command)`` holds."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "prompts.json").write_text("[[1, 2, 3]]")
    proc = subprocess.Popen([sys.executable, "-m", "sp_core.app.cli", "logits", "--model", model, "--prompts",
                             str(tmp_path / "prompts.json"), "--out", str(tmp_path / "out.safetensors"),
                             "--engine", "sglang", "--tp", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=dict(os.environ, TMPDIR=str(tmp)),
                            preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.time() + 200
    while time.time() < deadline:
        others = {pid: v for pid, v in _session_processes(proc.pid).items() if pid != proc.pid}
        if until(proc.pid, others):
            return proc, tmp
        assert proc.poll() is None, f"sp-core ended early, exit {proc.returncode}"
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the engine's processes did not appear within 200 s")


def _workers_started(parent, others):  # the engine host and its children: 2 schedulers + the detokenizer
    return sum(1 for ppid, _ in others.values() if ppid != parent) >= 3


@pytest.fixture(scope="module")
def sglang_ckpt(tmp_path_factory):
    return make_checkpoint("qwen3", str(tmp_path_factory.mktemp("faults-sglang") / "m"))


@_needs_sglang
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_stops_sglang_workers_within_2s(sglang_ckpt, tmp_path, signum):
    """SIGTERM, or Ctrl-C (SIGINT to the terminal's process group), while sglang's workers run: no process of
    the engine (host, schedulers, detokenizer) is alive 2 s after the signal, the command exits 143 / 130 and no
    engine scratch directory is left (before: the workers outlived the signal by the host's 10 s close grace)."""
    proc, tmp = _start_sglang(sglang_ckpt, tmp_path, _workers_started)
    start = time.time()
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the engine host leads a group of its own
    else:
        proc.send_signal(signum)
    workers_gone = exited = None
    while time.time() < start + 30 and (workers_gone is None or exited is None):
        left = {pid for pid, (_, cmd) in _session_processes(proc.pid).items()
                if pid != proc.pid and "resource_tracker" not in cmd}  # the tracker ends with the command
        if workers_gone is None and not left:
            workers_gone = time.time() - start
        if exited is None and proc.poll() is not None:
            exited = time.time() - start
        time.sleep(0.02)
    left = _wait_until_gone(proc.pid, seconds=1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    print(f"{signal.Signals(signum).name}: workers gone after {workers_gone} s, exit {proc.returncode} after {exited} s")
    assert proc.returncode == 128 + signum and not left, (proc.returncode, left)
    # the workers within 2 s; the command's own exit ~0.2 s, but up to 2.8 s seen with 2 cores under load
    # average 7 (a starved interpreter): 3 s here (before: 10 s and 12 s)
    assert workers_gone is not None and workers_gone <= 2.0 and exited <= 3.0, (workers_gone, exited)
    assert not [p for p in os.listdir(tmp) if p.startswith("sp-core-sglang-")], os.listdir(tmp)


@_needs_sglang
def test_killed_command_leaves_no_engine_scratch(sglang_ckpt, tmp_path):
    """kill -9 of `sp-core logits --engine sglang` once its engine host runs: the host removes the command's
    scratch directory (<tmp>/sp-core-sglang-PID-XXXX) as it ends its process group (before: an empty one was
    left on every kill)."""
    proc, tmp = _start_sglang(sglang_ckpt, tmp_path, lambda parent, others: others and any(
        p.startswith("sp-core-sglang-") for p in os.listdir(tmp_path / "tmp")))
    proc.kill()
    proc.wait()
    left = _wait_until_gone(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, left
    assert not [p for p in os.listdir(tmp) if p.startswith("sp-core-sglang-")], os.listdir(tmp)


def test_next_engine_start_reaps_scratch_of_dead_owners(tmp_path, monkeypatch):
    """A scratch directory whose owner is gone (killed before its engine host started) is removed when the
    next engine's is made; a live owner's is kept."""
    import tempfile

    from sp_core_sglang.cli_engine import engine_process

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"sp-core-sglang-{dead.pid}-abcd1234"
    stale.mkdir()
    live = tmp_path / f"sp-core-sglang-{os.getppid()}-abcd1234"
    live.mkdir()
    mine = engine_process.scratch_dir()
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, os.path.basename(mine)])
    assert os.path.basename(mine).startswith(f"sp-core-sglang-{os.getpid()}-")
