"""What one call dispatches: ATen ops (a TorchDispatchMode counter), collectives among them (c10d ops, so a
framework's own collectives count too) and the autograd nodes a forward records. Deterministic counts of
host work, for tests and for benchmarks/host_overhead.py."""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "symm_mem")


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher's Python mode, by name (views and no-op ``to`` /
    ``contiguous`` that return their input without dispatching are not ops)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def collectives(self) -> int:
        return sum(n for name, n in self.ops.items() if name.split(".")[0] in COLLECTIVE_NAMESPACES)

    def aten(self) -> int:
        """Ops other than collectives."""
        return sum(self.ops.values()) - self.collectives()


def autograd_nodes(out: torch.Tensor) -> int:
    """Nodes of the graph that backward from ``out`` runs (AccumulateGrad of the parameters included)."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def count_ops(forward, grad=None) -> dict:
    """Ops of ``forward()`` and, when ``grad`` is given, of ``backward(grad)`` from its output:
    ``aten_fwd``, ``collectives_fwd``, ``aten_bwd``, ``collectives_bwd``, ``autograd_nodes`` and the ops by
    name (``ops_fwd``, ``ops_bwd``)."""
    with OpCounter() as fwd:
        out = forward()
    bwd = OpCounter()
    nodes = 0
    if grad is not None:
        nodes = autograd_nodes(out)
        with bwd:
            out.backward(grad)
    return {"aten_fwd": fwd.aten(), "collectives_fwd": fwd.collectives(), "aten_bwd": bwd.aten(),
            "collectives_bwd": bwd.collectives(), "autograd_nodes": nodes,
            "ops_fwd": dict(fwd.ops.most_common()), "ops_bwd": dict(bwd.ops.most_common())}
