"""Ours over symmetric memory (``transport``): peers' rows move by the CUDA copy engines on a side stream while
this rank's GEMM runs, so the transfer takes no SMs."""
from __future__ import annotations

import torch

from sp_core.mpu import door
from sp_core.mpu.async_tp import transport
from sp_core.mpu.async_tp.operands import as_autocast_would
from sp_core.mpu.async_tp.split import gather_beside_own_rows


def all_gather_matmul(parallel, a_shard: torch.Tensor, b: torch.Tensor):
    a_shard, b = as_autocast_would(a_shard, b)
    name, t, r = parallel.group.group_name, parallel.size, parallel.rank

    def start(shard, gathered):
        return transport.all_gather_start(shard, gathered, name, t, r)

    with door.issued(parallel, "all_gather", a_shard):
        return gather_beside_own_rows(parallel, a_shard, b, start)


def matmul_reduce_scatter(parallel, a: torch.Tensor, b: torch.Tensor, in_flight: bool) -> door.Pending:
    a, b = as_autocast_would(a, b)
    with door.issued(parallel, "reduce_scatter", a):
        return door.Pending(transport.matmul_reduce_scatter(a, b, parallel.group.group_name, parallel.size,
                                                         parallel.rank))
