"""SwiGLU MLP: fused gate/up column layer, down row layer."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.layers.linear import ColumnParallelLinear, RowParallelLinear, _divide
from sp_core.layers.sharding import Shard


class SwiGLUMLP(torch.nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        local = _divide(intermediate_size, mpu.context_for().size, "intermediate_size")
        shards = [Shard("gate", intermediate_size, local), Shard("up", intermediate_size, local)]
        self.gate_up_proj = ColumnParallelLinear.packed(hidden_size, shards, dtype=dtype)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor, num_tokens: Optional[int] = None) -> torch.Tensor:
        """num_tokens (real rows before SP padding): unused, every row is computed alike."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
