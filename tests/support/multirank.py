"""Multi-rank test harness: the library's launcher with a test-sized timeout."""
from __future__ import annotations

import os

from sp_core.mpu import launch
from sp_core.mpu.launch import RankFailed  # noqa: F401

DEFAULT_TIMEOUT = float(os.environ.get("SP_CORE_TEST_TIMEOUT", "240"))


def run_ranks(world: int, fn, *args, tp=None, sequence_parallel: bool = True, timeout: float = DEFAULT_TIMEOUT):
    """Run ``fn(*args)`` on ``world`` ranks with mpu initialised; a failing rank's traceback is raised.
    On an accelerator machine with fewer devices than ``world`` the test is skipped (reported as such)."""
    from sp_core.mpu import platform

    if platform.device_type() != "cpu" and world > platform.device_count():
        import pytest

        pytest.skip(f"needs {world} devices; this machine has {platform.device_count()}")
    return launch.run_ranks(world, _ResultsOnCPU(fn), *args, tp=tp, sequence_parallel=sequence_parallel,
                            timeout=timeout)


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
