"""The route through a framework's communicator (sglang's ``GroupCoordinator``) for the sum all-reduce,
all-gather and reduce-scatter, so the framework's custom all-reduce and CUDA-graph-safe paths apply; a max
all-reduce and the all-gather start stay on torch.distributed, and a reduce-scatter start runs now
(serving, the only user of a communicator, runs no backward to overlap)."""
from __future__ import annotations

import torch

from sp_core.mpu import door
from sp_core.mpu.routes.torch_distributed import TorchDistributed


class FrameworkCommunicator(TorchDistributed):
    def all_reduce(self, x: torch.Tensor, op: str = "sum", in_place: bool = False) -> torch.Tensor:
        if op != "sum":
            return super().all_reduce(x, op, in_place)
        p = self.parallel
        # the communicator may reduce in place: the caller's x stays intact unless it gave it away
        out = x if in_place and x.is_contiguous() else x.contiguous().clone()
        with door.issued(p, "all_reduce", x, p.communicator):
            return p.communicator.all_reduce(out)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parallel
        x = x.contiguous()
        out = door.rows_times(x, p.size)
        with door.issued(p, "all_gather", x, p.communicator):
            p.communicator.all_gather_into_tensor(out, x)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parallel
        door.check_divisible(p, x, "reduce_scatter")
        x = x.contiguous()
        out = door.rows_over(x, p.size)
        with door.issued(p, "reduce_scatter", x, p.communicator):
            p.communicator.reduce_scatter_tensor(out, x)
        return out

    def reduce_scatter_start(self, x: torch.Tensor) -> door.Pending:
        return door.Pending(self.reduce_scatter(x))
