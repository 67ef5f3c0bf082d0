"""Parallel linear layers, with the contracts of docs/design.md's table (principle 5; all rows: docs/layers.md).

Column: token shard in (SP) -> all tokens, feature shard out; gathers its input (g).
Row: all tokens, feature shard in -> token shard out (g-bar under SP, f-bar otherwise).
Replicated: token shard in -> token shard out, or all tokens when ``gather_output``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.layers.sharding import Shard, mark_partitioned, mark_sequence_parallel
from sp_core.mpu import collectives
from sp_core.mpu.platform import amp_backward, amp_forward


def _divide(total: int, t: int, what: str) -> int:
    if total % t != 0:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {t}")
    return total // t


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features]; a 2-D x (token-major, the usual case) as it is: a view is an op too, and
    every op costs host time."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _shaped_like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[rows, n] back to x's leading dims (rows free: a gather or a scatter changed them)."""
    return out if x.dim() == 2 else out.view(-1, *x.shape[1:-1], out.shape[-1])


def _gathered_input_linear(parallel, x_shard: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """g(x) @ W^T + b (the forward of ``_GatheredInputLinear``; alone where no gradient is recorded)."""
    _, out = collectives.all_gather_matmul(parallel, _rows(x_shard), weight.t())
    out = _shaped_like(out, x_shard)
    return out + bias if bias is not None else out


def _reduce_scattered_output_linear(parallel, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g-bar(x @ W^T) (the forward of ``_ReduceScatteredOutputLinear``; alone where no gradient is recorded)."""
    return _shaped_like(collectives.matmul_reduce_scatter(parallel, _rows(x), weight.t()), x)


class _GatheredInputLinear(torch.autograd.Function):
    """y = g(x) @ W^T + b, saving the token shard x (not the gathered input) for backward.

    Forward: the gather fused with the GEMM where it pays (``mpu.async_tp``). Backward re-gathers x for
    the weight gradient and reduce-scatters the input gradient, as Megatron does under SP (the paper's
    section 4.2.2: activations stored per rank are 1/t); the gather overlaps the input-gradient GEMM,
    whose reduce-scatter is fused with it or overlaps the weight-gradient GEMM.
    """

    @staticmethod
    @amp_forward
    def forward(ctx, x_shard, weight, bias, parallel):
        ctx.save_for_backward(x_shard, weight)
        ctx.has_bias, ctx.parallel = bias is not None, parallel
        return _gathered_input_linear(parallel, x_shard, weight, bias)

    @staticmethod
    @amp_backward
    def backward(ctx, grad_out):
        x_shard, weight = ctx.saved_tensors
        gathering = collectives.all_gather_start(ctx.parallel, x_shard)
        grad_2d = _rows(grad_out)
        reducing = collectives.matmul_reduce_scatter_start(ctx.parallel, grad_2d, weight)
        x_all = gathering.wait()
        grad_weight = grad_2d.t() @ _rows(x_all)
        grad_bias = grad_2d.sum(0) if ctx.has_bias else None
        return _shaped_like(reducing.wait(), x_shard), grad_weight, grad_bias, None


class _ReduceScatteredOutputLinear(torch.autograd.Function):
    """y = g-bar(x @ W^T): the row layer under SP, the reduce-scatter fused with the GEMM where it pays.
    Backward: g-bar's all-gather of the gradient, fused with the input-gradient GEMM likewise."""

    @staticmethod
    @amp_forward
    def forward(ctx, x, weight, parallel):
        ctx.save_for_backward(x, weight)
        ctx.parallel = parallel
        return _reduce_scattered_output_linear(parallel, x, weight)

    @staticmethod
    @amp_backward
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_all, grad_in = collectives.all_gather_matmul(ctx.parallel, _rows(grad_out), weight)
        grad_weight = grad_all.t() @ _rows(x)
        return _shaped_like(grad_in, x), grad_weight, None


class ColumnParallelLinear(torch.nn.Module):
    """Output features split over TP. ``ColumnParallelLinear.packed`` builds one whose output packs
    several pieces (a fused qkv or gate/up), each split over TP on its own. ``parallel``: the model's
    context (default: the one being built with, see ``mpu.building``)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, dtype: Optional[torch.dtype] = None,
                 parallel: Optional[mpu.ParallelContext] = None):
        super().__init__()
        self.parallel = mpu.context_for(parallel)
        self._make_parameters(input_size, [Shard(None, output_size, _divide(output_size, self.parallel.size,
                                                                            "output size"))], bias, dtype)

    @classmethod
    def packed(cls, input_size: int, shards: Sequence[Shard], bias: bool = False,
               dtype: Optional[torch.dtype] = None,
               parallel: Optional[mpu.ParallelContext] = None) -> "ColumnParallelLinear":
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.parallel = mpu.context_for(parallel)
        layer._make_parameters(input_size, shards, bias, dtype)
        return layer

    def _make_parameters(self, input_size: int, shards: Sequence[Shard], bias: bool, dtype) -> None:
        self.shards: List[Shard] = list(shards)
        own = [s for s in self.shards if s.replicas == 1]
        alike = [s for s in self.shards if s.replicas > 1]
        if alike and (not own or self.shards[:len(own)] != own or len({s.replicas for s in alike}) > 1):
            raise ValueError(f"replicated pieces must follow the others and share one replica count: {self.shards}")
        self.input_size = input_size
        self.output_size_per_partition = sum(s.local for s in self.shards)
        # Rows that several ranks hold alike (KV heads fewer than t) are a parameter of their own, which
        # only the first holder counts in a gradient norm (sharding.mark_partitioned); it loads and exports
        # under the packed name (sharding.packed_name).
        self.replicas = alike[0].replicas if alike else 1
        self.weight = self._parameter(own, input_size, dtype)
        self.replicated_weight = self._parameter(alike, input_size, dtype)
        self.bias = self._parameter(own, None, dtype) if bias else None
        self.replicated_bias = self._parameter(alike, None, dtype) if bias else None

    def _parameter(self, shards: List[Shard], input_size: Optional[int], dtype) -> Optional[torch.nn.Parameter]:
        if not shards:
            return None
        local = sum(s.local for s in shards)
        if input_size is None:
            param = torch.nn.Parameter(torch.zeros(local, dtype=dtype))
        else:
            param = torch.nn.Parameter(torch.empty(local, input_size, dtype=dtype))
            torch.nn.init.normal_(param, std=0.02)
        mark_partitioned(param, 0, shards, self.parallel)
        return param

    def _packed(self, own: Optional[torch.Tensor], alike: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """One tensor of all rows; the replicated rows each see only this rank's query heads, so their
        gradient is summed over their holders."""
        return own if alike is None else torch.cat([own, mpu.copy_to_replicas(alike, self.replicas, self.parallel)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the deterministic mode keeps the packed GEMM without autograd too: a training forward and serving
        # then run the same GEMM (a kernel may round a column differently when N changes)
        p = self.parallel
        if self.replicated_weight is not None and not torch.is_grad_enabled() and not p.deterministic:
            return self._serve(x)
        weight, bias = self._packed(self.weight, self.replicated_weight), self._packed(self.bias, self.replicated_bias)
        if p.sequence_parallel_active:
            if torch.is_grad_enabled():
                return _GatheredInputLinear.apply(x, weight, bias, p)
            return _gathered_input_linear(p, x, weight, bias)
        return F.linear(mpu.copy_to_tp(x, p), weight, bias)

    def _serve(self, x: torch.Tensor) -> torch.Tensor:
        """No gradient, replicated rows: one GEMM per parameter on the (once gathered) input, rather than a
        copy of the weights per call."""
        if not self.parallel.sequence_parallel_active:
            return torch.cat([F.linear(x, self.weight, self.bias),
                              F.linear(x, self.replicated_weight, self.replicated_bias)], dim=-1)
        x_all, own = collectives.all_gather_matmul(self.parallel, _rows(x), self.weight.t())
        out = torch.cat([own, x_all @ self.replicated_weight.t()], dim=-1)
        if self.bias is not None:
            out = out + torch.cat([self.bias, self.replicated_bias])
        return _shaped_like(out, x)


class RowParallelLinear(torch.nn.Module):
    """Input features split over TP; the partial products are summed (f-bar) or reduce-scattered (g-bar)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: Optional[torch.dtype] = None, parallel: Optional[mpu.ParallelContext] = None):
        super().__init__()
        self.parallel = mpu.context_for(parallel)
        local = _divide(input_size, self.parallel.size, "input size")
        self.weight = torch.nn.Parameter(torch.empty(output_size, local, dtype=dtype))
        mark_partitioned(self.weight, 1, [Shard(None, input_size, local)], self.parallel)
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=dtype))
            mark_sequence_parallel(self.bias)
        torch.nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parallel
        if p.sequence_parallel_active:
            if torch.is_grad_enabled():
                out = _ReduceScatteredOutputLinear.apply(x, self.weight, p)
            else:
                out = _reduce_scattered_output_linear(p, x, self.weight)
        elif torch.is_grad_enabled():
            out = mpu.reduce_from_tp(F.linear(x, self.weight), p)
        else:  # f-bar's plain all-reduce, into the partial product this layer just made (no copy of it)
            out = collectives.all_reduce(p, F.linear(x, self.weight), in_place=True)
        return out + self.bias if self.bias is not None else out


class ReplicatedLinear(torch.nn.Module):
    """Every rank holds the whole weight and applies it to its own tokens."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 dtype: Optional[torch.dtype] = None, parallel: Optional[mpu.ParallelContext] = None):
        super().__init__()
        self.parallel = mpu.context_for(parallel)
        self.gather_output = gather_output
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=dtype))
        mark_sequence_parallel(self.weight)
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=dtype))
            mark_sequence_parallel(self.bias)
        torch.nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.gather_output and self.parallel.sequence_parallel_active:
            out = mpu.gather_from_sp(out, self.parallel)
        return out
