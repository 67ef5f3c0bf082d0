"""sglang engines in a process of their own, never in the caller's.

``sglang.Engine.shutdown()`` kills every child of the process that made the engine
(``kill_process_tree(os.getpid(), include_parent=False)`` in ``srt/entrypoints/engine.py``), and an error
in a scheduler kills that process outright. In the caller's process that would take down its other
children too -- for example the fork server and resource tracker of ``sp_core.procs.launch``, after which
the next ``run_ranks`` fails. So engines live in one helper process, the *engine host*: spawned on first
use, reused for later engines (it imports sglang once), ended at exit or when its caller goes away.
``RemoteEngine`` forwards ``generate``, ``collective_rpc``, ``refit`` and ``shutdown`` to it. A handle pickles:
another process (a trainer rank of ``sp_core.procs.launch``) that unpickles it reaches the same engine
through the host's listener (a Unix socket with a random key), one request at a time with the caller's.

The host leads a process group of its own, which sglang's processes (schedulers, detokenizer) join when it
spawns them. Ending the host ends that group: at the caller's exit (``close``, also after Ctrl-C or SIGTERM
in the middle of an engine start, when the host cannot answer) and, from a watchdog thread in the host,
as soon as the caller is gone (killed outright), so that no sglang process outlives the command. On SIGTERM
or SIGINT the command's handler ends the group at once (``abort``, through ``sp_core.app.interrupts``): a host
busy starting an engine or serving a request cannot answer a close. An engine's scratch directory
(``scratch_dir``) carries its caller's pid: the host removes it when the caller is killed outright, and the
next one made removes those whose owner is gone.
"""
from __future__ import annotations

import atexit
import glob
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from sp_core import settings
from sp_core.app import interrupts

CALL_TIMEOUT = settings.current().engine_timeout
CLOSE_GRACE = 10.0  # seconds an idle host gets to shut its engines down before its process group is killed


class EngineProcessDied(RuntimeError):
    pass


class RemoteEngine:
    """An ``sglang.Engine`` in the engine host: ``generate(**kwargs)``, ``collective_rpc(method, **kwargs)``,
    ``release_memory_occupation(tags)``, ``resume_memory_occupation(tags)`` and ``shutdown()`` as sglang's;
    ``refit(payloads, weight_version)`` as ``sp_core_sglang.refit.apply``."""

    def __init__(self, host, engine_id: int):
        self._host, self._id = host, engine_id

    def __reduce__(self):
        return _attach, (self._host.address, self._host.authkey, self._id)

    def generate(self, **kwargs) -> Any:
        return self._host.request("generate", self._id, kwargs)

    def collective_rpc(self, method: str, **kwargs) -> None:
        self._host.request("rpc", self._id, method, kwargs)

    def refit(self, payloads, weight_version: str, flush_cache: bool = True) -> dict:
        """Load one refit (one payload per server TP rank, ``sp_core_sglang.refit``) into the engine."""
        return self._host.request("refit", self._id, payloads, weight_version, flush_cache)

    def release_memory_occupation(self, tags: Optional[List[str]] = None) -> None:
        self.call(_release_memory, tags)

    def resume_memory_occupation(self, tags: Optional[List[str]] = None) -> None:
        self.call(_resume_memory, tags)

    def call(self, fn: Callable, *args) -> Any:
        """``fn(engine, *args)`` in the engine host, with this handle's ``sglang.Engine``."""
        return self._host.request("engine_call", self._id, fn, args)

    def shutdown(self) -> None:
        if self._id is not None:
            engine_id, self._id = self._id, None
            if not self._host.aborted:  # an aborted host took its engines along
                self._host.request("shutdown", engine_id)


def _release_memory(engine, tags):
    engine.release_memory_occupation(tags=tags)


def _resume_memory(engine, tags):
    engine.resume_memory_occupation(tags=tags)


def _attach(address: str, authkey: bytes, engine_id: int) -> RemoteEngine:
    return RemoteEngine(_Client(address, authkey), engine_id)


class _Client:
    """Another process's way to the engine host: its listener (``RemoteEngine.__reduce__``)."""
    aborted = False

    def __init__(self, address: str, authkey: bytes):
        self.address, self.authkey, self._conn = address, authkey, None

    def request(self, op: str, *args) -> Any:
        from multiprocessing.connection import Client

        if self._conn is None:
            try:
                self._conn = Client(self.address, family="AF_UNIX", authkey=self.authkey)
            except OSError as err:
                raise EngineProcessDied(f"the sglang engine host does not answer at {self.address} ({err})") from None
        self._conn.send((op, *args))
        try:
            ok, payload = self._conn.recv()
        except EOFError:
            raise EngineProcessDied("the sglang engine process exited; its output says why") from None
        if not ok:
            raise payload
        return payload


class _Host:
    aborted = False

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch threads
        self._conn, child_end = ctx.Pipe()
        # in a scratch directory: removed with the others if this process dies outright (``scratch_dir``)
        self.address = os.path.join(scratch_dir(), "engines.sock")
        self.authkey = os.urandom(16)
        # not a daemon: sglang's Engine starts processes of its own
        self.process = ctx.Process(target=_serve, args=(child_end, os.getpid(), self.address, self.authkey),
                                   name="sp-core-sglang-engines")
        self.process.start()
        child_end.close()

    def request(self, op: str, *args, timeout: float = CALL_TIMEOUT) -> Any:
        try:
            self._conn.send((op, *args))
        except (BrokenPipeError, OSError):
            raise self._died() from None
        deadline = time.monotonic() + timeout
        while not self._conn.poll(1.0):
            if not self.process.is_alive():
                raise self._died()
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"the sglang engine did not answer {op!r} within {timeout:.0f} s "
                                   f"(SP_CORE_ENGINE_TIMEOUT); its process was stopped")
        try:
            ok, payload = self._conn.recv()
        except EOFError:
            raise self._died() from None
        if not ok:
            raise payload
        return payload

    def _died(self) -> EngineProcessDied:
        self.process.join(timeout=5)
        return EngineProcessDied(f"the sglang engine process exited (exit code {self.process.exitcode}); "
                                 f"its output above says why")

    def close(self) -> None:
        """Ask the host to shut its engines down; a host that does not end within ``CLOSE_GRACE`` (busy
        starting an engine) is killed with its process group, sglang's processes included."""
        if self.process.is_alive():
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=CLOSE_GRACE)
        _kill_group(self.process.pid)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self._conn.close()
        shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)

    def abort(self) -> None:
        """The command was interrupted: end the host and sglang's processes now (SIGKILL to its process
        group), with no grace -- a host busy starting an engine or serving a request would not answer."""
        self.aborted = True
        _kill_group(self.process.pid)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=1)
        shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)


def _kill_group(pgid: int) -> None:
    """SIGKILL to the host's process group (what is left of it: sglang's workers end with the host)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_HOST: Optional[_Host] = None


def host() -> _Host:
    """The engine host, started (or restarted, if it died) on demand."""
    global _HOST
    if _HOST is None or not _HOST.process.is_alive():
        if _HOST is None:
            atexit.register(close)  # before multiprocessing's own exit hook joins its children
        _HOST = _Host()
    return _HOST


def abort() -> None:
    """End the engine host and every sglang process at once (the command's SIGTERM / SIGINT handler calls it
    through ``sp_core.app.interrupts``); a later ``close`` only reaps."""
    if _HOST is not None:
        _HOST.abort()


interrupts.on_interrupt(abort)


def close() -> None:
    """Shut down every engine and end the engine host (idempotent)."""
    global _HOST
    if _HOST is not None:
        _HOST.close()
        _HOST = None


def start(start_fn: Callable, *args, **kwargs) -> RemoteEngine:
    """``start_fn(*args, **kwargs)`` in the engine host, under the caller's current environment (the
    engine's workers inherit it); returns a handle on the engine it made."""
    engine_id = host().request("start", dict(os.environ), start_fn, args, kwargs)
    return RemoteEngine(_HOST, engine_id)


def warm_up() -> None:
    """Start the engine host now, without waiting for it: it imports sglang in the background (on CPU,
    ``_import_ahead``), while the caller does other work before its first engine."""
    host()


SCRATCH_PREFIX = "sp-core-sglang-"


def scratch_dir() -> str:
    """A new directory for an engine's files (its workers' collective log), ``<tmp>/sp-core-sglang-PID-XXXX``
    for this process: the engine host removes those of its caller if the caller dies outright (kill -9), and
    each new one first removes those whose owner is gone (the host may have died with it)."""
    reap_scratch()
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


def _scratch_dirs() -> Dict[str, int]:
    """Engine scratch directories under <tmp> -> the pid that made them."""
    found = {}
    for path in glob.glob(os.path.join(tempfile.gettempdir(), SCRATCH_PREFIX + "*-*")):
        owner = os.path.basename(path)[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and os.path.isdir(path):
            found[path] = int(owner)
    return found


def _remove_scratch_of(pid: int) -> None:
    for path, owner in _scratch_dirs().items():
        if owner == pid:
            shutil.rmtree(path, ignore_errors=True)


def reap_scratch() -> None:
    """Remove the engine scratch directories whose owner process is gone."""
    for path, owner in _scratch_dirs().items():
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass


def call(fn: Callable, *args) -> Any:
    """``fn(*args)`` in the engine host (where sglang is imported and set up for this platform)."""
    return host().request("call", fn, args)


# -- in the engine host -----------------------------------------------------------------------------

def _portable(err: BaseException) -> BaseException:
    """The error to send back: itself when it pickles, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")


def _end_with_caller(caller_pid: int) -> None:
    """The host's watchdog: when the caller is gone (its children are re-parented), end the host's process
    group at once -- an engine start in progress would otherwise leave sglang's processes running."""
    while os.getppid() == caller_pid:
        time.sleep(0.5)
    _remove_scratch_of(caller_pid)  # the caller cannot any more
    os.killpg(os.getpgid(0), signal.SIGKILL)


_LOCK = threading.Lock()  # one engine request at a time: sglang's Engine runs its requests on one event loop


def _listen(engines: Dict[int, Any], address: str, authkey: bytes) -> None:
    """Requests from other processes holding a pickled ``RemoteEngine`` (a thread per connection)."""
    from multiprocessing.connection import Listener

    listener = Listener(address, family="AF_UNIX", authkey=authkey)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, multiprocessing.AuthenticationError):
            continue
        threading.Thread(target=_answer, args=(engines, conn), daemon=True, name="sp-core-engine-client").start()


def _answer(engines: Dict[int, Any], conn) -> None:
    while True:
        try:
            op, *args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((True, _handle_locked(engines, op, args)))
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the caller
            conn.send((False, _portable(err)))


def _handle_locked(engines: Dict[int, Any], op: str, args) -> Any:
    with _LOCK:
        return _handle(engines, op, args)


def _serve(conn, caller_pid: int, address: str, authkey: bytes) -> None:
    from sp_core.mpu import platform
    from sp_core_sglang.cli_engine import cpu_env

    os.setpgid(0, 0)  # a group of its own (module docstring)
    threading.Thread(target=_end_with_caller, args=(caller_pid,), name="end-with-caller", daemon=True).start()

    if platform.device_type() == "cpu":
        cpu_env.apply_cpu_engine_env(1)  # before anything imports sglang; each engine sets its own tp
        _import_ahead()
    engines: Dict[int, Any] = {}
    threading.Thread(target=_listen, args=(engines, address, authkey), daemon=True, name="sp-core-listener").start()
    try:
        while True:
            try:
                op, *args = conn.recv()
            except EOFError:  # the caller is gone
                return
            if op == "close":
                return
            try:
                conn.send((True, _handle_locked(engines, op, args)))
            except BaseException as err:  # noqa: BLE001 - every failure goes back to the caller
                conn.send((False, _portable(err)))
    finally:
        for engine in engines.values():
            engine.shutdown()


def _import_ahead() -> None:
    """On CPU, as soon as the host starts (while its caller does other work): the fork server of the
    engines' workers starts importing sglang (``forking``) and so does the host, at the level its engines
    log at (sglang's import-time warnings are not wanted)."""
    import logging

    from sp_core_sglang.cli_engine import forking

    forking.warm_up()
    logging.getLogger("sglang").setLevel(logging.ERROR)
    try:
        import sglang.srt.entrypoints.engine  # noqa: F401
    except ImportError:  # the engine start says so, as before
        pass


def _handle(engines: Dict[int, Any], op: str, args) -> Any:
    if op == "start":
        env, start_fn, fn_args, fn_kwargs = args
        imported_with = {k: os.environ[k] for k in ("SGLANG_USE_CPU_ENGINE",) if k in os.environ}  # read at import
        os.environ.clear()
        os.environ.update(env, **imported_with)
        engine = start_fn(*fn_args, **fn_kwargs)
        engine_id = max(engines, default=0) + 1
        engines[engine_id] = engine
        return engine_id
    if op == "generate":
        engine_id, kwargs = args
        return engines[engine_id].generate(**kwargs)
    if op == "rpc":
        engine_id, method, kwargs = args
        return engines[engine_id].collective_rpc(method, **kwargs)
    if op == "refit":
        from sp_core_sglang import refit

        engine_id, payloads, version, flush_cache = args
        return refit.apply(engines[engine_id], payloads, version, flush_cache=flush_cache)
    if op == "engine_call":
        engine_id, fn, fn_args = args
        return fn(engines[engine_id], *fn_args)
    if op == "shutdown":
        engines.pop(args[0]).shutdown()
        return None
    if op == "call":
        fn, fn_args = args
        return fn(*fn_args)
    raise ValueError(f"unknown engine host request {op!r}")
