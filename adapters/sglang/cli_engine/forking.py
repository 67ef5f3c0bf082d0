"""On a CPU machine, sglang's worker processes forked from a fork server that has imported sglang once.

sglang starts each engine's scheduler (one per TP rank) and detokenizer with the ``spawn`` start method:
every worker is a fresh interpreter that imports torch and sglang again, ~14 s of CPU each on a CPU
machine (three per tp-2 engine), most of an engine start. In the engine host (``engine_process``)
``ForkingEngine`` makes them with ``forkserver`` instead, from one fork server that has imported sglang's
scheduler and detokenizer modules (``PRELOAD``) and is kept from engine to engine; each worker then
starts with its modules in place. What a spawned worker would have had is given to each forked one:

- the environment of the moment sglang starts it (``_InEnvironment``: per engine the adapter's
  switches, the collective log, the thread binding; SP_CORE_* settings are read again), the OpenMP
  thread count that environment asks for, SIGQUIT's default action;
- its failure report: sglang's workers send SIGQUIT to their parent, which is now the fork server;
  the fork server passes it on to the engine host (``zygote_init``), whose handler ends the engine as
  before;
- the engine's ``shutdown()`` ends every process of the host as before, except the fork server itself.

The engine itself (arguments, model classes, requests) is unchanged.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import os
import signal
from typing import Any, Callable, Dict

# What every worker imports first (run_scheduler_process / run_detokenizer_process and their modules);
# zygote_init first: it makes the fork server pass its children's SIGQUIT on to the engine host.
PRELOAD = ["sp_core_sglang.cli_engine.zygote_init", "torch", "sglang.srt.managers.scheduler",
           "sglang.srt.managers.detokenizer_manager"]


class _Bound:
    """A worker's target, run under the environment it was started with."""

    def __init__(self, fn: Callable, env: Dict[str, str]):
        self.fn, self.env = fn, env

    def __call__(self, *args, **kwargs) -> Any:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)  # the fork server's forwarding is not the worker's
        os.environ.clear()
        os.environ.update(self.env)
        from sp_core import settings

        settings.reread()
        threads = self.env.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:  # what a fresh interpreter's OpenMP would read
            import torch

            torch.set_num_threads(int(threads))
        return self.fn(*args, **kwargs)


class _InEnvironment:
    """``fn`` as a worker's target: pickled when sglang starts the worker, with the environment of that
    moment (as a spawned worker inherits it)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs) -> Any:  # run here (not through a fork server): as is
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        return _Bound, (self.fn, dict(os.environ))


def _forkserver_pid():
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)


_PATCHED = False


def _patch_engine_module(engine_module) -> None:
    """sglang's launch sets the ``spawn`` start method and its shutdown kills every process of the host:
    after the one, ``forkserver`` (with ``PRELOAD``); the other skips the fork server (its children, this
    engine's workers, still end)."""
    global _PATCHED
    if _PATCHED:
        return
    set_envs_and_config, kill_process_tree = engine_module._set_envs_and_config, engine_module.kill_process_tree

    @functools.wraps(set_envs_and_config)
    def set_envs_then_forkserver(*args, **kwargs):
        set_envs_and_config(*args, **kwargs)
        multiprocessing.set_forkserver_preload(PRELOAD)
        multiprocessing.set_start_method("forkserver", force=True)

    @functools.wraps(kill_process_tree)
    def kill_all_but_forkserver(parent_pid, include_parent=True, skip_pid=None, **kwargs):
        if parent_pid == os.getpid() and not include_parent and skip_pid is None:
            skip_pid = _forkserver_pid()
        return kill_process_tree(parent_pid, include_parent=include_parent, skip_pid=skip_pid, **kwargs)

    engine_module._set_envs_and_config = set_envs_then_forkserver
    engine_module.kill_process_tree = kill_all_but_forkserver
    _PATCHED = True


def warm_up() -> None:
    """Start the fork server now (its imports run in the background, e.g. while other rows run)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()


def engine_class():
    """``sglang.Engine`` whose workers come from the fork server (module docstring)."""
    from sglang.srt.entrypoints import engine as engine_module

    _patch_engine_module(engine_module)

    class ForkingEngine(engine_module.Engine):
        run_scheduler_process_func = _InEnvironment(engine_module.Engine.run_scheduler_process_func)
        run_detokenizer_process_func = _InEnvironment(engine_module.Engine.run_detokenizer_process_func)

    return ForkingEngine
