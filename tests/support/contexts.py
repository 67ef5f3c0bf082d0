"""Tests that run one model at a time in a rank change the default context the way a user holding one model
would: by making a new one (``mpu.bind`` on the same group), which models built after it take."""
from __future__ import annotations

import contextlib
from typing import Iterator

from sp_core import mpu

_UNSET = object()


def remake(group=_UNSET, **changes) -> mpu.ParallelContext:
    """A context like the default, with ``changes`` (sequence_parallel, deterministic, communicator, settings)
    and optionally another ``group``; made the default."""
    base = mpu.default_context()
    fields = dict(sequence_parallel=base.sequence_parallel, deterministic=base.deterministic,
                  communicator=base.communicator, settings=base.settings, cp_group=base.cp_group)
    fields.update(changes)
    return mpu.bind(base.group if group is _UNSET else group, **fields)


@contextlib.contextmanager
def default_with(group=_UNSET, **changes) -> Iterator[mpu.ParallelContext]:
    """``remake`` for the block; a context like the one before it is the default after it."""
    before = mpu.default_context()
    made = remake(group, **changes)
    try:
        yield made
    finally:
        _restore(before)


@contextlib.contextmanager
def single_process(**changes) -> Iterator[mpu.ParallelContext]:
    """A one-rank default context (no group) with ``changes`` for the block; the default before it (or none)
    after it."""
    before = mpu.default_context() if mpu.is_initialized() else None
    made = mpu.bind(None, **changes)
    try:
        yield made
    finally:
        _restore(before)


def _restore(context) -> None:
    """The very context object that was the default (models built before the block hold it)."""
    from sp_core.mpu import context as module

    module._DEFAULT = context
