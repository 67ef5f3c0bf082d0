"""What the fused forms share: the GEMM operands autocast would have chosen."""
from __future__ import annotations

import torch


def as_autocast_would(a: torch.Tensor, b: torch.Tensor):
    """The GEMM operands autocast would hand ``a @ b``: the fused forms multiply with ``out=`` (or in
    torch's fused ops), which autocast does not see -- fp32 weights under bf16 autocast would not match."""
    kind = a.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        return a.to(dtype), b.to(dtype)
    return a, b


def gathered_product(a_shard: torch.Tensor, b: torch.Tensor, t: int) -> torch.Tensor:
    """An empty output of ``all_gather(a_shard) @ b``."""
    return a_shard.new_empty((a_shard.shape[0] * t,) + tuple(a_shard.shape[1:-1]) + (b.shape[-1],))
