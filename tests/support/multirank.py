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
    return launch.run_ranks(world, fn, *args, tp=tp, sequence_parallel=sequence_parallel, timeout=timeout)
