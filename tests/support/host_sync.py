"""Counting host syncs on CPU: the operations that would make the host wait for a GPU.

A TorchDispatchMode sees every aten call (forward and, on the CPU autograd engine, backward, which
runs on the calling thread). Counted: reading a value back (``item`` / ``bool`` / ``int`` ->
``_local_scalar_dense``), outputs whose shape depends on the data (``nonzero``, ``masked_select``,
``unique``, boolean-mask indexing), and copies to the host (``tolist`` is counted at the Python level).
``torch._assert_async`` is not counted: on a GPU it asserts without waiting.
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                "unique_consecutive", "unique_dim", "repeat_interleave", "equal", "is_nonzero")
_SYNCING_METHODS = {"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"}


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNCING_OPS and not (name == "repeat_interleave" and "output_size" in (kwargs or {})):
            self.counts[name] += 1
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.counts["index (boolean mask)"] += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _SYNCING_METHODS:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """Yields a Counter: host-syncing operations issued inside the block, by name."""
    counts = collections.Counter()
    with _Function(counts), _Dispatch(counts):
        yield counts
