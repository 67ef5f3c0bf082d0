"""Unfused: the collective, then (or after) the GEMM. The only form of a context with a framework
communicator or the deterministic mode: its collectives are the route's."""
from __future__ import annotations

import torch

from sp_core.mpu import collectives, door


def all_gather_matmul(parallel, a_shard: torch.Tensor, b: torch.Tensor):
    gathered = collectives.all_gather(parallel, a_shard)
    return gathered, gathered @ b


def matmul_reduce_scatter(parallel, a: torch.Tensor, b: torch.Tensor, in_flight: bool) -> door.Pending:
    if in_flight:
        return parallel.route.reduce_scatter_start(a @ b)
    return door.Pending(collectives.reduce_scatter(parallel, a @ b))
