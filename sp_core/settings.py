"""Every SP_CORE_* environment setting, read and checked in this one module.

``current()`` reads the environment the first time it is asked (once per process: a forward never reads
the environment); a ``ParallelContext`` keeps the ``Settings`` it was made with, so two models in one
process may hold different ones (``dataclasses.replace(settings, async_tp="off")``). ``read()`` checks
a mapping without caching it (the CLI's up-front check; tests).

    SP_CORE_DEVICE               cuda | npu | cpu: force a device (default: the accelerator this process sees)
    SP_CORE_FUSED                0 turns every optional fused kernel off (default 1)
    SP_CORE_ASYNC_TP             auto | off | ring | split | copy_engine | symm_mem (default auto: the table)
    SP_CORE_ASYNC_TP_TABLE       a JSON decision table replacing the measured one
    SP_CORE_COLLECTIVE_LOG       a file each collective appends "<pid> <op> <shape> <route>" to (tests)
    SP_CORE_COLLECTIVE_TIMEOUT   seconds a rank may wait in one collective (default 600)
    SP_CORE_LOG_DIR              where the CLI writes the frameworks' logs
    SP_CORE_ENGINE_TIMEOUT       seconds an sglang engine call may take (default 900)
    SP_CORE_MAX_CPU_RANKS        the most gloo ranks the CLI starts on a CPU machine
    SP_CORE_SP_MIN_TOKENS        sglang: prefill batches below it run plain TP (default: the measured crossover)
    SP_CORE_KV_POOL_LOG          sglang: a file each worker appends its KV pool's class and row width to (tests)
    SP_CORE_SGLANG               1: sglang loads the adapter's model classes (the plugin)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Mapping, Optional

ASYNC_TP_FORMS = ("off", "ring", "split", "copy_engine", "symm_mem")
DEVICES = ("cuda", "npu", "cpu")
DEFAULT_COLLECTIVE_TIMEOUT = 600.0
DEFAULT_ENGINE_TIMEOUT = 900.0


class SettingError(ValueError):
    """One line naming the setting, its value and what is accepted."""


@dataclasses.dataclass(frozen=True)
class Settings:
    device: Optional[str] = None
    fused: bool = True
    async_tp: str = "auto"
    async_tp_table: Optional[str] = None
    collective_log: Optional[str] = None
    collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT
    log_dir: Optional[str] = None
    engine_timeout: float = DEFAULT_ENGINE_TIMEOUT
    max_cpu_ranks: Optional[int] = None
    sp_min_tokens: Optional[str] = None  # the sglang adapter parses it (its own error)
    kv_pool_log: Optional[str] = None
    sglang_plugin: bool = False


def _positive(env: Mapping[str, str], name: str, parse, what: str, default=None):
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise SettingError(f"{name}={raw!r}: expected {what}")
    return value


def _one_of(env: Mapping[str, str], name: str, accepted, default):
    raw = env.get(name) or default
    if raw is not None and raw not in accepted:
        raise SettingError(f"{name}={raw!r} is not supported; use {', '.join(accepted)}")
    return raw


def read(env: Optional[Mapping[str, str]] = None) -> Settings:
    """The settings in ``env`` (default: this process's environment), checked; SettingError otherwise."""
    env = os.environ if env is None else env
    log_dir = env.get("SP_CORE_LOG_DIR") or None
    if log_dir and os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise SettingError(f"SP_CORE_LOG_DIR={log_dir!r} is not a directory; expected a directory for the "
                           f"framework logs")
    return Settings(
        device=_one_of(env, "SP_CORE_DEVICE", DEVICES, None),
        fused=env.get("SP_CORE_FUSED", "1") != "0",
        async_tp=_one_of(env, "SP_CORE_ASYNC_TP", ("auto",) + ASYNC_TP_FORMS, "auto"),
        async_tp_table=env.get("SP_CORE_ASYNC_TP_TABLE") or None,
        collective_log=env.get("SP_CORE_COLLECTIVE_LOG") or None,
        collective_timeout=_positive(env, "SP_CORE_COLLECTIVE_TIMEOUT", float, "a positive number of seconds",
                                     DEFAULT_COLLECTIVE_TIMEOUT),
        log_dir=log_dir,
        engine_timeout=_positive(env, "SP_CORE_ENGINE_TIMEOUT", float, "a positive number of seconds",
                                 DEFAULT_ENGINE_TIMEOUT),
        max_cpu_ranks=_positive(env, "SP_CORE_MAX_CPU_RANKS", int, "a positive integer"),
        sp_min_tokens=(env.get("SP_CORE_SP_MIN_TOKENS") or "").strip() or None,
        kv_pool_log=env.get("SP_CORE_KV_POOL_LOG") or None,
        sglang_plugin=env.get("SP_CORE_SGLANG", "").strip() == "1",
    )


@functools.lru_cache(maxsize=1)
def current() -> Settings:
    """This process's settings, read from the environment once (the first time asked)."""
    return read()


def reread() -> Settings:
    """Forget the settings read so far and read the environment again: for a process whose environment was
    set after it started (a rank, an engine worker) -- contexts made before keep theirs."""
    current.cache_clear()
    return current()
