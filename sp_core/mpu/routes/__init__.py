"""How a context's sums and gathers travel, one route per file, chosen once when the context is made:

    torch_distributed       torch.distributed on the context's group (standalone, Megatron)
    framework_communicator  the framework's communicator for the sum all-reduce, all-gather and reduce-scatter
                            (sglang's GroupCoordinator: its custom all-reduce, CUDA-graph-safe paths); the async
                            starts stay on torch.distributed (serving runs no backward)
    rank_order_sums         the deterministic mode: every sum taken in rank order, whichever rank owns the row,
                            over either of the above for the gathers

Each route has ``all_reduce(x, op, in_place)``, ``all_gather(x)``, ``reduce_scatter(x)`` and the starts
``all_gather_start(x)`` / ``reduce_scatter_start(x)`` returning a ``collectives.Pending``.
"""
from __future__ import annotations

from sp_core.mpu.routes.framework_communicator import FrameworkCommunicator
from sp_core.mpu.routes.rank_order_sums import RankOrderSums
from sp_core.mpu.routes.torch_distributed import TorchDistributed


def for_context(parallel):
    plain = FrameworkCommunicator(parallel) if parallel.communicator is not None else TorchDistributed(parallel)
    return RankOrderSums(parallel, plain) if parallel.deterministic else plain
