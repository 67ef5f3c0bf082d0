"""The one door every collective goes through: counted, on the activity board (the hang detector) while
inside, left in a ``finally``; and the shapes the collectives share. ``collectives`` and the routes and
async-TP forms that carry them call it; nothing else does.

Every call is counted (``counts()``), and appended to the context's ``settings.collective_log`` when set,
as ``<pid> <op> <shape> <route>`` (route: the communicator's class name, or ``torch``), so tests can prove
which collectives a forward issued and through what, also inside worker processes.
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

from sp_core.mpu import activity

_COUNTS: Dict[str, int] = collections.Counter()


def start(op: str, tensor=None, communicator=None, log: Optional[str] = None) -> None:
    """Count the collective and mark this rank as waiting in it (``activity``: the hang detector). Only
    ``issued`` and ``Pending`` (through ``in_flight``) call it, and both leave in a ``finally``: a rank never
    stays "waiting" after a collective returned or raised (the hang detector would kill a working run)."""
    if tensor is not None:
        _COUNTS[op] += 1
        if log:
            route = type(communicator).__name__ if communicator is not None else "torch"
            shape = str(tuple(tensor.shape)).replace(" ", "")
            with open(log, "a") as out:
                out.write(f"{os.getpid()} {op} {shape} {route}\n")
    activity.enter_collective(op, None if tensor is None else tensor.shape)


@contextlib.contextmanager
def issued(parallel, op: str, tensor=None, communicator=None) -> Iterator[None]:
    """The one door of every blocking collective: counted (unless ``tensor`` is None), on the activity
    board while inside, left in a ``finally``."""
    start(op, tensor, communicator, parallel.settings.collective_log)
    try:
        yield
    finally:
        activity.leave_collective()


class Pending:
    """A collective in flight (``async_op``): ``wait()`` returns its result. Lets a caller overlap the
    communication with independent compute, e.g. a GEMM. Started through ``in_flight``; the wait leaves."""

    def __init__(self, out: torch.Tensor, work=None, dtype: torch.dtype | None = None):
        self._out, self._work, self._dtype = out, work, dtype

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            work, self._work = self._work, None
            try:
                work.wait()
            finally:
                activity.leave_collective()
        return self._out if self._dtype is None else self._out.to(self._dtype)


def in_flight(parallel, op: str, x: torch.Tensor, launch) -> Pending:
    """A ``Pending`` of ``launch()``, entered on the board before the launch and left by its wait -- or now,
    if the launch itself raises."""
    start(op, x, None, parallel.settings.collective_log)
    try:
        return launch()
    except BaseException:
        activity.leave_collective()
        raise


def counts() -> Dict[str, int]:
    return dict(_COUNTS)


@contextlib.contextmanager
def counting() -> Iterator[Dict[str, int]]:
    """Yields a dict that, after the block, holds the collectives issued inside it."""
    before = collections.Counter(_COUNTS)
    result: Dict[str, int] = {}
    try:
        yield result
    finally:
        after = collections.Counter(_COUNTS)
        after.subtract(before)
        result.update({k: v for k, v in after.items() if v})


def check_divisible(parallel, x: torch.Tensor, what: str) -> None:
    t = parallel.size
    if x.shape[0] % t != 0:
        raise ValueError(
            f"{what}: dim 0 has {x.shape[0]} rows, not a multiple of the tp size {t}; "
            f"pad with sp_core.mpu.enter_sequence_parallel (or pad_to_multiple) first"
        )


def rows_times(x: torch.Tensor, t: int) -> torch.Tensor:
    """An empty output of ``t`` times x's rows (an all-gather's)."""
    return x.new_empty((x.shape[0] * t,) + tuple(x.shape[1:]))


def rows_over(x: torch.Tensor, t: int) -> torch.Tensor:
    """An empty output of 1/t of x's rows (a reduce-scatter's)."""
    return x.new_empty((x.shape[0] // t,) + tuple(x.shape[1:]))


def global_rank(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank
