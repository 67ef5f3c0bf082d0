"""The terminal of an ``sp-core`` command, kept apart from the frameworks' own output.

By default (``quiet``) everything written to file descriptors 1 and 2 while a command runs — torch,
Megatron, sglang, warnings, and every process started meanwhile (ranks, fork server, sglang's
workers) — goes to a log file; the command's own lines (progress, table, verdict, errors) go to the
terminal through ``out()`` / ``err()``. ``--verbose`` leaves both streams alone.
"""
from __future__ import annotations

import contextlib
import glob
import os
import sys
import tempfile
import time
from typing import Iterator, Optional, TextIO

from sp_core import settings
from sp_core.procs import terminal
from sp_core.procs.terminal import err, out, say  # noqa: F401  (the command's own lines)

_LOG: Optional[str] = None  # this command's log file, until announced
_ANNOUNCED = False
KEEP_LOGS = 20


def announce(command: str) -> None:
    """Once the command starts its real work: say where the frameworks' output goes."""
    global _ANNOUNCED
    if _LOG and not _ANNOUNCED:
        say(f"sp-core {command}: framework output goes to {_LOG}")
        _ANNOUNCED = True


def log_path() -> Optional[str]:
    """This command's log file (kept once a message names it)."""
    global _ANNOUNCED
    _ANNOUNCED = _ANNOUNCED or _LOG is not None
    return _LOG


def log_dir() -> str:
    return settings.current().log_dir or os.path.join(tempfile.gettempdir(), "sp-core-logs")


def _new_log(command: str) -> str:
    directory = log_dir()
    os.makedirs(directory, exist_ok=True)
    old = sorted(glob.glob(os.path.join(directory, "*.log")), key=os.path.getmtime)
    for path in old[:max(0, len(old) - KEEP_LOGS + 1)]:  # keep the most recent logs only
        with contextlib.suppress(OSError):
            os.remove(path)
    return os.path.join(directory, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def _own_copy(stream: TextIO) -> TextIO:
    """A stream that keeps writing where ``stream`` writes now, after fds 1 and 2 are redirected."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture buffer): stays as it is
        return stream
    stream.flush()
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="replace")


@contextlib.contextmanager
def quiet(command: str, verbose: bool) -> Iterator[Optional[str]]:
    """Send fds 1 and 2 to a new log file for the block; yields its path (None when ``verbose``)."""
    global _LOG, _ANNOUNCED
    if verbose:
        yield None
        return
    path = _new_log(command)
    console_out, console_err = _own_copy(sys.stdout), _own_copy(sys.stderr)
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    terminal.use(console_out, console_err)
    _LOG, _ANNOUNCED = path, False
    try:
        yield path
    finally:
        log.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        for stream in (console_out, console_err):
            stream.flush()
            if stream not in saved_streams:
                stream.close()
        if not _ANNOUNCED:  # bad input: the command stopped before any work worth a log
            os.remove(path)
        terminal.use(None, None)
        _LOG, _ANNOUNCED = None, False
        log.close()
