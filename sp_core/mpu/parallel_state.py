"""Tensor-parallel group and the one sequence-parallel switch.

Either ``initialize`` creates the TP group (standalone use, tests, the CLI) or ``bind`` takes a group a
framework already made (the adapters; nothing is created), optionally with the framework's own
communicator for that group (sglang's GroupCoordinator), which ``collectives`` then calls. Layers ask
``sequence_parallel_active()``; no SP flag travels through forward signatures.

The deterministic mode (``set_deterministic``, off by default) is the other switch kept here: with it on,
sums over TP are taken in rank order whichever rank owns a row (``collectives``) and GEMMs compute each
row in fixed-size blocks (``sp_core.layers.batch_invariant``), so a token's log-probabilities do not
depend on the batch around it, nor on the framework that runs the core. Megatron's ``deterministic_mode``
and sglang's ``--enable-deterministic-inference`` turn it on through the adapters.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from sp_core.mpu import platform


class ParallelStateError(RuntimeError):
    pass


@dataclass
class _State:
    group: Optional[dist.ProcessGroup]
    rank: int
    size: int
    sequence_parallel: bool
    owns_group: bool
    communicator: Optional[Any] = None
    deterministic: bool = False
    backend: Optional[str] = None  # the group's collective backend, asked once (collectives ask per call)


_STATE: Optional[_State] = None


def initialize(tp_size: int, sequence_parallel: bool = True, backend: Optional[str] = None) -> None:
    """Create TP groups of ``tp_size`` consecutive ranks over the default process group.

    Initialises torch.distributed from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    when it is not initialised yet.
    """
    global _STATE
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or platform.backend())
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size != 0:
        raise ParallelStateError(
            f"tensor-parallel size {tp_size} does not divide the world size {world}; "
            f"use a tp size among {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, tp_size):
        ranks = list(range(start, start + tp_size))
        group = dist.new_group(ranks)  # every rank must call new_group for every group
        if rank in ranks:
            mine = group
    _STATE = _State(mine, rank % tp_size, tp_size, sequence_parallel and tp_size > 1, owns_group=True,
                    backend=dist.get_backend(mine))


def bind(group: Optional[dist.ProcessGroup], sequence_parallel: bool = False, communicator: Any = None) -> None:
    """Use a TP group that a framework already created (Megatron, sglang). Creates nothing.

    ``communicator``: the framework's own communicator over ``group``, e.g. sglang's ``GroupCoordinator``
    (its custom all-reduce, symmetric memory and CUDA-graph-safe paths). When given, the sum all-reduce,
    all-gather and reduce-scatter of ``collectives`` go through its ``all_reduce(x)``,
    ``all_gather_into_tensor(out, x)`` and ``reduce_scatter_tensor(out, x)``.
    """
    global _STATE
    if group is None:
        size, rank = 1, 0
    else:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
    _STATE = _State(group, rank, size, sequence_parallel and size > 1, owns_group=False, communicator=communicator,
                    backend=dist.get_backend(group) if group is not None else None)


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """A one-rank TP state for this block (e.g. to build a model on the meta device and read its
    shapes in a launcher process); the previous state, if any, comes back after it."""
    global _STATE
    before = _STATE
    _STATE = _State(None, 0, 1, False, owns_group=False)
    try:
        yield
    finally:
        _STATE = before


def destroy() -> None:
    global _STATE
    if _STATE is not None and _STATE.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _STATE = None


def is_initialized() -> bool:
    return _STATE is not None


def _state() -> _State:
    if _STATE is None:
        raise ParallelStateError(
            "sp_core.mpu is not initialised: call sp_core.mpu.initialize(tp_size) or "
            "sp_core.mpu.bind(group) before using parallel layers or operators"
        )
    return _STATE


def tp_group() -> Optional[dist.ProcessGroup]:
    return _state().group


def tp_backend() -> Optional[str]:
    """The TP group's collective backend ("nccl", "gloo", ...; None without a group)."""
    return _state().backend


def communicator() -> Any:
    """The framework communicator given to ``bind``, or None (torch.distributed on the group)."""
    return _state().communicator


def tp_rank() -> int:
    return _state().rank


def tp_size() -> int:
    return _state().size


def sequence_parallel_active() -> bool:
    """The one switch that layers read."""
    return _state().sequence_parallel


def deterministic() -> bool:
    """Whether the deterministic (batch-invariant) mode is on."""
    return _STATE is not None and _STATE.deterministic


def set_deterministic(active: bool) -> None:
    """The one entry point of the deterministic mode: batch-invariant collectives and GEMMs (slower;
    docs/benchmarks.md has the cost). Stays until set again or the state is re-initialised."""
    _state().deterministic = bool(active)


def set_sequence_parallel(active: bool) -> None:
    state = _state()
    state.sequence_parallel = bool(active) and state.size > 1


@contextlib.contextmanager
def sequence_parallel(active: bool) -> Iterator[None]:
    """SP on (or off) for the forward inside this block, e.g. a serving prefill batch."""
    state = _state()
    before = state.sequence_parallel
    set_sequence_parallel(active)
    try:
        yield
    finally:
        state.sequence_parallel = before
