"""torch's symmetric-memory ``fused_all_gather_matmul`` / ``fused_matmul_reduce_scatter`` (CUDA copy engines
over NVLink; no multicast)."""
from __future__ import annotations

import torch

from sp_core.mpu import door
from sp_core.mpu.async_tp.operands import as_autocast_would


def all_gather_matmul(parallel, a_shard: torch.Tensor, b: torch.Tensor):
    a_shard, b = as_autocast_would(a_shard, b)
    with door.issued(parallel, "all_gather", a_shard):
        gathered, (out,) = torch.ops.symm_mem.fused_all_gather_matmul(
            a_shard, [b], 0, parallel.group.group_name, return_A=True)
    return gathered, out


def matmul_reduce_scatter(parallel, a: torch.Tensor, b: torch.Tensor, in_flight: bool) -> door.Pending:
    a, b = as_autocast_would(a, b)
    with door.issued(parallel, "reduce_scatter", a):
        return door.Pending(torch.ops.symm_mem.fused_matmul_reduce_scatter(a, b, "sum", 0, parallel.group.group_name))
