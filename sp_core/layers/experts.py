"""Expert FFNs (SwiGLU) for the MoE block: the routed experts as one grouped GEMM, and the shared experts.

Routed experts are stored as transformers keeps them in memory: ``gate_up_proj`` [E, 2I, H] (gate rows,
then up rows) and ``down_proj`` [E, H, I], here E = this rank's experts and I = this rank's slice of
the intermediate size. Tokens arrive sorted by expert; the GEMMs run as ``torch._grouped_mm`` where the
platform has it, else one GEMM per non-empty expert on its contiguous rows (never a per-token loop).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sp_core.kernels import lookup


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` [N, in] holds ``rows[e]`` consecutive rows per group e (``rows``: an integer tensor on x's
    device); row block e is multiplied by ``weight[e]`` [out, in] (as ``F.linear``). Returns [N, out].
    The grouped GEMM reads the group sizes on the device (no host sync: CUDA-graph safe); the fallback
    loop needs them on the host."""
    if lookup.grouped_mm_supports(x, weight):
        return torch._grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=rows.cumsum(0).to(torch.int32))
    pieces = [F.linear(block, weight[e]) for e, block in enumerate(x.split(rows.tolist())) if block.shape[0]]
    if not pieces:  # keep the weight in the graph, so its gradient is zero rather than missing
        return F.linear(x, weight[0])
    return torch.cat(pieces)


def grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The gradient of ``grouped_linear(x, weight, rows)``'s weight: ``grad[e]^T @ x[e]`` per row block."""
    if lookup.grouped_mm_supports(x, weight):
        return torch._grouped_mm(grad.t(), x.contiguous(), offs=rows.cumsum(0).to(torch.int32))
    out = torch.zeros_like(weight)
    for e, (g, block) in enumerate(zip(grad.split(rows.tolist()), x.split(rows.tolist()))):
        if block.shape[0]:
            out[e] = g.t() @ block
    return out


class GroupedExperts(torch.nn.Module):
    """SwiGLU experts ``[num_experts, ...]`` applied to rows sorted by expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype))
        self.down_proj = torch.nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype))
        torch.nn.init.normal_(self.gate_up_proj, std=0.02)
        torch.nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, rows: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scale`` [N] (float32, the routing weights) multiplies each row's activation before the down
        projection: equal to weighting the output, and it keeps a TP-sharded expert's routing-weight
        gradient a sum of per-rank partials like every other partial product."""
        return self.activate_and_down(grouped_linear(x, self.gate_up_proj, rows), rows, scale)

    def activate_and_down(self, gate_up: torch.Tensor, rows: torch.Tensor,
                          scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rest of ``forward`` after the gate_up GEMM."""
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        if scale is not None:
            act = (act.float() * scale[:, None]).to(act.dtype)
        return grouped_linear(act, self.down_proj, rows)


class _Weight(torch.nn.Module):
    """Holds ``weight`` under the name a checkpoint expects (``shared_experts.gate_up_proj.weight``)."""

    def __init__(self, rows: int, cols: int, dtype: Optional[torch.dtype]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(rows, cols, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)


class SharedExperts(torch.nn.Module):
    """The shared experts as one SwiGLU MLP of width ``intermediate_size`` (this rank's slice). The MoE
    block owns the communication: its output is partial when sharded, complete when replicated."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.gate_up_proj = _Weight(2 * intermediate_size, hidden_size, dtype)
        self.down_proj = _Weight(hidden_size, intermediate_size, dtype)

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.activate_and_down(F.linear(x, self.gate_up_proj.weight), scale)

    def activate_and_down(self, gate_up: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scale`` [N, 1] (Qwen2-MoE's shared expert gate) multiplies each row's activation before the down
        projection, as the routed experts' routing weights do: a sharded shared expert then saves its [N, I/t]
        activation for the scale's gradient, never a [N, H] output."""
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        return F.linear(act if scale is None else act * scale, self.down_proj.weight)
