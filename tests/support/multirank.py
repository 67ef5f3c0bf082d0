"""Multi-rank test harness: the library's launcher with a test-sized timeout, one launch per tp for a test
module, and what several modules do inside their ranks."""
from __future__ import annotations

import contextlib
import os

from sp_core.procs import launch
from sp_core.procs.launch import RankFailed  # noqa: F401

DEFAULT_TIMEOUT = float(os.environ.get("SP_CORE_TEST_TIMEOUT", "240"))


def run_ranks(world: int, fn, *args, tp=None, sequence_parallel: bool = True, timeout: float = DEFAULT_TIMEOUT,
              cp: int = 1):
    """Run ``fn(*args)`` on ``world`` ranks with mpu initialised; a failing rank's traceback is raised.
    On an accelerator machine with fewer devices than ``world`` the test is skipped (reported as such)."""
    from sp_core.mpu import platform

    if platform.device_type() != "cpu" and world > platform.device_count():
        import pytest

        pytest.skip(f"needs {world} devices; this machine has {platform.device_count()}")
    return launch.run_ranks(world, _ResultsOnCPU(fn), *args, tp=tp, sequence_parallel=sequence_parallel,
                            timeout=timeout, cp=cp)


def launches_per_tp(rank_fn, *args):
    """``get(tp)``: rank 0's result of ``rank_fn(*args, tp)`` on ``tp`` ranks, launched once per tp and
    kept (hold it in a module-scoped fixture: a test module computes everything one tp needs in one launch,
    because starting gloo ranks on 2 cores is the expensive part)."""
    results = {}

    def get(tp: int):
        if tp not in results:
            results[tp] = run_ranks(tp, rank_fn, *args, tp)[0]
        return results[tp]

    return get


def launches_per_cp_tp(rank_fn, *args):
    """``get(cp, tp)``: rank 0's result of ``rank_fn(*args, cp, tp)`` on cp x tp ranks (TP innermost), launched
    once per (cp, tp) and kept, as ``launches_per_tp``."""
    results = {}

    def get(cp: int, tp: int):
        if (cp, tp) not in results:
            results[cp, tp] = run_ranks(cp * tp, rank_fn, *args, cp, tp, tp=tp, cp=cp)[0]
        return results[cp, tp]

    return get


# -- inside a rank ---------------------------------------------------------------------------------------

def saved_bytes_on_every_rank(model_dir: str, tokens: int, **kwargs) -> dict:
    """{"dense": [bytes per rank], "sparse": [...]}: bytes one dense / one MoE (or sparse-attention) decoder
    layer saves for backward, measured on every rank (``sp_core.app.memory``) and gathered."""
    import torch

    from sp_core import mpu
    from sp_core.app.memory import _measure_rank
    from sp_core.mpu import collectives, platform

    mine = _measure_rank(model_dir, tokens, **kwargs)
    mine = torch.tensor([[mine["dense"], mine["sparse"]]], device=platform.current_device())
    every = collectives.all_gather(mpu.default_context(), mine)
    return {"dense": every[:, 0].tolist(), "sparse": every[:, 1].tolist()}


@contextlib.contextmanager
def collective_log(prefix: str):
    """Inside a rank: every sp_core collective is logged to ``<prefix>.<tp rank>`` (SP_CORE_COLLECTIVE_LOG)
    within the block, which yields ``gathered(fn) -> (fn(), shapes)``: runs ``fn()`` and returns its result and
    the shapes it all-gathered, e.g. ["(5,48)"]."""
    import dataclasses

    from sp_core import mpu
    from support.contexts import remake

    path = f"{prefix}.{mpu.default_context().rank}"
    remake(settings=dataclasses.replace(mpu.default_context().settings, collective_log=path))

    def gathered(fn):
        open(path, "w").close()
        result = fn()
        with open(path) as f:
            return result, [line.split()[2] for line in f if " all_gather " in line]  # "<pid> <op> <shape> <route>"

    try:
        yield gathered
    finally:
        remake(settings=dataclasses.replace(mpu.default_context().settings, collective_log=None))


class _ResultsOnCPU:
    """``fn`` whose result comes back with every tensor on the CPU: a rank's device tensors do not
    outlive the rank (NCCL runs), and the tests compare them with CPU references."""

    def __init__(self, fn):
        self.fn, self.__name__ = fn, getattr(fn, "__name__", "the function")

    def __call__(self, *args):
        return _on_cpu(self.fn(*args))


def _on_cpu(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value
