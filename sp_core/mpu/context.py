"""The parallel context: what one model's forwards and backwards need to know about parallelism, made once.

A ``ParallelContext`` holds the TP group (this rank's index and the group's size), the sequence-parallel
flag, the deterministic flag, the framework communicator (sglang's GroupCoordinator) if one is bound,
and the ``Settings`` read from the environment. From those it derives, once, the collective route (torch.
distributed, the framework's communicator, or the rank-order-invariant sums: ``sp_core.mpu.routes``) and
the async-TP policy (``sp_core.mpu.async_tp``). It is immutable: a model with other settings gets another
context (``replace``), so two models live side by side in one process -- a policy that trains with SP
next to a deterministic reference without it, or models on different TP groups.

Layers receive it at construction (``building``) and keep a reference; operators and collectives take it
as an argument, as Megatron passes process groups. SP changes per call only through one door,
``sequence_parallel_for`` (sglang's per-batch choice; a Megatron config's fixed one).

Context parallelism (CP): ``cp_group`` / ``cp_rank`` / ``cp_size``, the ranks that hold other parts of the
same sequences (ranks = cp x tp, TP innermost: the CP group joins the ranks of equal TP rank). ``cp`` is
the CP group seen as a context of its own, so the collectives and operators act on it as on TP (counted
through the same door); with cp 1 it has size 1 and every collective on it is the identity.

Made by ``initialize`` (creates the TP groups: standalone use, tests, the CLI) or ``bind`` (a group a
framework made; creates nothing). The context made last is the default for code that names none (a
user's one model, the README's examples).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, List, Optional

import torch.distributed as dist

from sp_core import settings as settings_module
from sp_core.mpu import async_tp, platform, routes
from sp_core.settings import Settings


class ParallelStateError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True, eq=False)
class ParallelContext:
    group: Optional[dist.ProcessGroup] = None
    rank: int = 0
    size: int = 1
    sequence_parallel: bool = False  # as made; ``sequence_parallel_active`` is what a forward runs
    deterministic: bool = False
    communicator: Any = None  # a framework's communicator over ``group`` (sglang's GroupCoordinator)
    backend: Optional[str] = None  # the group's collective backend ("nccl", "gloo"; None without a group)
    settings: Settings = dataclasses.field(default_factory=settings_module.current)
    owns_group: bool = False
    cp_group: Optional[dist.ProcessGroup] = None
    cp_rank: int = 0
    cp_size: int = 1
    _switch: List[bool] = dataclasses.field(default_factory=list, repr=False)  # sequence_parallel_for's stack

    @property
    def sequence_parallel_active(self) -> bool:
        """Whether this forward runs SP: the context's flag, or the innermost ``sequence_parallel_for``."""
        active = self._switch[-1] if self._switch else self.sequence_parallel
        return active and self.size > 1

    @contextlib.contextmanager
    def sequence_parallel_for(self, active: bool) -> Iterator["ParallelContext"]:
        """SP on (or off) for the forwards inside this block (e.g. one serving batch); the one door."""
        self._switch.append(bool(active))
        try:
            yield self
        finally:
            self._switch.pop()

    def replace(self, **changes) -> "ParallelContext":
        """Another context on the same group with ``changes`` (e.g. ``deterministic=True``)."""
        return dataclasses.replace(self, _switch=[], owns_group=False, **changes)

    @functools.cached_property
    def cp(self) -> "ParallelContext":
        """The CP group as a context (no SP, no framework communicator): what ``gather_from_cp`` acts on."""
        return dataclasses.replace(self, group=self.cp_group, rank=self.cp_rank, size=self.cp_size,
                                   sequence_parallel=False, communicator=None, owns_group=False, _switch=[],
                                   backend=dist.get_backend(self.cp_group) if self.cp_group is not None else None,
                                   cp_group=None, cp_rank=0, cp_size=1)

    @functools.cached_property
    def route(self):
        """How this context's sums and gathers travel (chosen once: ``sp_core.mpu.routes``)."""
        return routes.for_context(self)

    @functools.cached_property
    def async_tp(self):
        """Which fused GEMM + collective form each call takes (``sp_core.mpu.async_tp``)."""
        return async_tp.Policy.for_context(self)


_DEFAULT: Optional[ParallelContext] = None
_BUILDING: List[ParallelContext] = []


def _made(context: ParallelContext) -> ParallelContext:
    global _DEFAULT
    _DEFAULT = context
    return context


def initialize(tp_size: int, sequence_parallel: bool = True, backend: Optional[str] = None,
               deterministic: bool = False, settings: Optional[Settings] = None, cp_size: int = 1) -> ParallelContext:
    """Create TP groups of ``tp_size`` consecutive ranks over the default process group, and CP groups of
    ``cp_size`` ranks of equal TP rank within each block of cp x tp consecutive ranks; this rank's context.

    Initialises torch.distributed from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    when it is not initialised yet.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or platform.backend())
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size != 0:
        raise ParallelStateError(
            f"tensor-parallel size {tp_size} does not divide the world size {world}; "
            f"use a tp size among {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if cp_size < 1 or world % (cp_size * tp_size) != 0:
        raise ParallelStateError(
            f"context-parallel size {cp_size} x tensor-parallel size {tp_size} does not divide the world size {world}")
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, tp_size):
        ranks = list(range(start, start + tp_size))
        group = dist.new_group(ranks)  # every rank must call new_group for every group
        if rank in ranks:
            mine = group
    cp_mine = None
    if cp_size > 1:
        block = cp_size * tp_size
        for start in range(0, world, block):
            for tp_rank in range(tp_size):
                ranks = list(range(start + tp_rank, start + block, tp_size))
                group = dist.new_group(ranks)
                if rank in ranks:
                    cp_mine = group
    return _made(ParallelContext(mine, rank % tp_size, tp_size, sequence_parallel and tp_size > 1, deterministic,
                                 backend=dist.get_backend(mine), settings=settings or settings_module.current(),
                                 owns_group=True, cp_group=cp_mine, cp_rank=(rank // tp_size) % cp_size,
                                 cp_size=cp_size))


def bind(group: Optional[dist.ProcessGroup], sequence_parallel: bool = False, communicator: Any = None,
         deterministic: bool = False, settings: Optional[Settings] = None,
         cp_group: Optional[dist.ProcessGroup] = None) -> ParallelContext:
    """The context of a TP group (and a CP group) that a framework already created (Megatron, sglang).
    Creates nothing.

    ``communicator``: the framework's own communicator over ``group``, e.g. sglang's ``GroupCoordinator``
    (its custom all-reduce, symmetric memory and CUDA-graph-safe paths). When given, the sum all-reduce,
    all-gather and reduce-scatter go through its ``all_reduce(x)``, ``all_gather_into_tensor(out, x)`` and
    ``reduce_scatter_tensor(out, x)``.
    """
    size, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    cp_size, cp_rank = (1, 0) if cp_group is None else (dist.get_world_size(cp_group), dist.get_rank(cp_group))
    return _made(ParallelContext(group, rank, size, sequence_parallel and size > 1, deterministic, communicator,
                                 dist.get_backend(group) if group is not None else None,
                                 settings or settings_module.current(), cp_group=cp_group if cp_size > 1 else None,
                                 cp_rank=cp_rank, cp_size=cp_size))


def single_rank(**changes) -> ParallelContext:
    """A one-rank context (e.g. to build a model on the meta device in a launcher process). Not the default."""
    return ParallelContext(**changes)


def default_context() -> ParallelContext:
    """The context made last by ``initialize`` or ``bind``: for code that names none."""
    if _DEFAULT is None:
        raise ParallelStateError(
            "sp_core.mpu is not initialised: call sp_core.mpu.initialize(tp_size) or "
            "sp_core.mpu.bind(group) before using parallel layers or operators"
        )
    return _DEFAULT


@contextlib.contextmanager
def building(context: ParallelContext) -> Iterator[ParallelContext]:
    """Layers constructed inside this block take ``context`` (a model's constructor enters it)."""
    _BUILDING.append(context)
    try:
        yield context
    finally:
        _BUILDING.pop()


def context_for(given: Optional[ParallelContext] = None) -> ParallelContext:
    """A layer's context: the one it was given, else the one being built with, else the default."""
    if given is not None:
        return given
    return _BUILDING[-1] if _BUILDING else default_context()


def destroy() -> None:
    """Forget the default context; destroy the process group if ``initialize`` created it."""
    global _DEFAULT
    if _DEFAULT is not None and _DEFAULT.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _DEFAULT = None


def is_initialized() -> bool:
    return _DEFAULT is not None
