"""Chunks passed around the ranks with point-to-point sends on the communicator's own stream while the GEMM
runs on this one (any backend; gloo on CPU)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from sp_core.mpu import door
from sp_core.mpu.async_tp.operands import as_autocast_would, gathered_product


def exchange(parallel, send: torch.Tensor, recv: torch.Tensor) -> list:
    """Send ``send`` to the next rank of the ring and receive ``recv`` from the previous, in flight."""
    t, r, group = parallel.size, parallel.rank, parallel.group
    ops = [dist.P2POp(dist.isend, send, door.global_rank(group, (r + 1) % t), group),
           dist.P2POp(dist.irecv, recv, door.global_rank(group, (r - 1) % t), group)]
    return dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def all_gather_matmul(parallel, a_shard: torch.Tensor, b: torch.Tensor):
    """At step s this rank holds rank (r - s)'s shard: it multiplies it while passing it on."""
    a_shard, b = as_autocast_would(a_shard, b)
    t, r, n = parallel.size, parallel.rank, a_shard.shape[0]
    with door.issued(parallel, "all_gather", a_shard):
        out = gathered_product(a_shard, b, t)
        gathered = door.rows_times(a_shard, t)
        gathered[r * n:(r + 1) * n].copy_(a_shard)
        for step in range(t):
            src = (r - step) % t
            works = exchange(parallel, gathered[src * n:(src + 1) * n],
                             gathered[(src - 1) % t * n:((src - 1) % t + 1) * n]) if step < t - 1 else []
            torch.matmul(gathered[src * n:(src + 1) * n], b, out=out[src * n:(src + 1) * n])
            _wait(works)
    return gathered, out


def matmul_reduce_scatter(parallel, a: torch.Tensor, b: torch.Tensor, in_flight: bool) -> door.Pending:
    """The partial sum for rank d starts at rank d + 1 and gains one term per hop, ending at d."""
    a, b = as_autocast_would(a, b)
    t, r = parallel.size, parallel.rank
    n = a.shape[0] // t
    with door.issued(parallel, "reduce_scatter", a):
        keep, works, incoming = [], [], None
        for step in range(t):
            dest = (r - 1 - step) % t
            partial = a[dest * n:(dest + 1) * n] @ b
            if incoming is not None:
                _wait(works)
                partial += incoming
            if step == t - 1:
                return door.Pending(partial)
            incoming = torch.empty_like(partial)
            keep += [partial, incoming]  # alive until their transfers are waited on
            works = exchange(parallel, partial, incoming)
    raise AssertionError("unreachable")
