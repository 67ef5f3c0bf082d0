"""Environment for the real ``sglang.Engine`` (0.5.23) on a CPU-only machine.

sglang's CPU path needs two binaries PyPI does not ship for a CPU torch (sgl-kernel's CPU build and a
torchvision that loads); ``cpu_backend`` has pure-torch fallbacks for them, which reach the engine's
processes through ``sys.path`` / ``PYTHONPATH`` only where the real ones are missing.

``SGLANG_USE_CPU_ENGINE`` is read when sglang is imported, so ``apply_cpu_engine_env`` must run before
the first ``import sglang`` in the process.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

from sp_core_sglang.cli_engine import cpu_backend


def _cpus() -> List[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def cpu_groups(tp_size: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND value: one '|'-separated CPU list per rank.

    Without an AMX-capable sgl-kernel, sglang does not bind threads itself
    (``srt/distributed/bootstrap.py::_init_cpu_threads_env``); the value only has to have one entry per
    rank (``srt/utils/numa_utils.py::init_threads_binding``). Cores are split contiguously; with more
    ranks than cores, ranks share cores round-robin.
    """
    cpus = _cpus()
    if tp_size <= len(cpus):
        per = len(cpus) // tp_size
        groups = [cpus[i * per: (i + 1) * per] for i in range(tp_size)]
    else:
        groups = [[cpus[i % len(cpus)]] for i in range(tp_size)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def cpu_engine_env(tp_size: int, fallbacks: Optional[str] = cpu_backend.DIR) -> Dict[str, str]:
    """Environment variables for a CPU ``sglang.Engine`` with ``tp_size`` ranks.

    - ``SGLANG_USE_CPU_ENGINE=1``: selects sglang's CPU platform (read at import).
    - ``SGLANG_CPU_OMP_THREADS_BIND``: needed once ranks outnumber NUMA nodes.
    - ``PYTHONPATH``: the ``cpu_backend`` directory prepended (when given), for the spawned processes.
    - ``OMP_NUM_THREADS``: cores / ranks (unless already set), to avoid oversubscription.
    """
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != fallbacks]
    env = {
        "SGLANG_USE_CPU_ENGINE": "1",
        "SGLANG_CPU_OMP_THREADS_BIND": cpu_groups(tp_size),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, len(_cpus()) // tp_size)),
    }
    if fallbacks:
        env["PYTHONPATH"] = os.pathsep.join([fallbacks, *parts])
    return env


def apply_cpu_engine_env(tp_size: int) -> None:
    """Apply ``cpu_engine_env`` to this process (env + sys.path), the ``cpu_backend`` fallbacks included
    only when sgl_kernel or torchvision is not importable. Call before importing sglang."""
    if "sglang" in sys.modules and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        raise RuntimeError("sglang was imported before SGLANG_USE_CPU_ENGINE=1 was set; its CPU detection is "
                           "already cached. Apply cpu_engine_env() before the first `import sglang`.")
    fallbacks = cpu_backend.DIR if cpu_backend.missing() else None
    os.environ.update(cpu_engine_env(tp_size, fallbacks))
    if fallbacks and fallbacks not in sys.path:
        sys.path.insert(0, fallbacks)
