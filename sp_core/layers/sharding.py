"""How a parameter is split over TP, recorded on the parameter itself.

Each partitioned parameter carries Megatron's attributes (``tensor_model_parallel``, ``partition_dim``,
``partition_stride``) and ``shards``: the pieces packed along the partition dim, each a
:class:`Shard`. Loading takes this rank's slice of a full (Hugging Face) tensor; exporting gathers the
full tensor back. Replicated parameters that see token shards carry ``sequence_parallel = True``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from sp_core.mpu import collectives
from sp_core.mpu.context import ParallelContext, context_for


@dataclass(frozen=True)
class Shard:
    """One piece packed along the partition dim (e.g. the k of a fused qkv).

    full: rows of the checkpoint tensor; local: rows on each rank; replicas: ranks holding the same
    rows (> 1 when there are fewer KV heads than ranks). local * t / replicas >= full; the rest is
    padding (a vocabulary not divisible by t).
    """

    name: Optional[str]
    full: int
    local: int
    replicas: int = 1


REPLICATED = "replicated_"  # name prefix of a packed layer's parameter whose rows several ranks hold alike


def mark_partitioned(param: torch.nn.Parameter, dim: int, shards: List[Shard], parallel: ParallelContext) -> None:
    """Megatron's attributes, ``shards`` and the rank's place in ``parallel``'s TP group (``tp_rank``,
    ``tp_size``). Megatron counts a parameter tagged ``tensor_model_parallel`` on every TP rank in a gradient
    norm, any other on TP rank 0 only: rows that ``replicas`` ranks hold alike are tagged on the first of
    them only (TP rank 0 is always one)."""
    replicas = {s.replicas for s in shards}
    if len(replicas) > 1:
        raise ValueError(f"pieces held by different numbers of ranks need parameters of their own: {shards}")
    param.tp_rank, param.tp_size = parallel.rank, parallel.size
    param.tensor_model_parallel = parallel.rank % replicas.pop() == 0
    param.partition_dim = dim
    param.partition_stride = 1
    param.shards = shards


def mark_sequence_parallel(param: torch.nn.Parameter) -> None:
    """A replicated parameter that sees token shards: its gradient is a partial sum under SP."""
    param.tensor_model_parallel = False
    param.sequence_parallel = True


def packed_name(name: str) -> str:
    """The name a parameter's pieces load and export under: ``x.replicated_weight`` (a packed layer's rows
    that several ranks hold alike) is ``x.weight``, the rest of that packed tensor."""
    head, dot, last = name.rpartition(".")
    return head + dot + last[len(REPLICATED):] if last.startswith(REPLICATED) else name


def load_full(param: torch.nn.Parameter, full: torch.Tensor, shard_name: Optional[str] = None) -> None:
    """Copy this rank's slice of the checkpoint tensor ``full`` into ``param``."""
    shards = getattr(param, "shards", None)
    if shards is None:
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"shape {tuple(full.shape)} does not match the parameter's {tuple(param.shape)}")
        param.data.copy_(full)
        return
    dim = param.partition_dim
    offset = 0
    for shard in shards:
        if shard.name == shard_name:
            break
        offset += shard.local
    else:
        raise KeyError(f"no shard named {shard_name!r} in {[s.name for s in shards]}")
    if full.shape[dim] != shard.full:
        raise ValueError(f"size {full.shape[dim]} along dim {dim} does not match the expected {shard.full}")
    start, rows = _rows_of(param, shard)
    piece = full.narrow(dim, min(start, shard.full), rows)
    target = param.data.narrow(dim, offset, shard.local)
    target.zero_()  # vocabulary padding stays zero
    target.narrow(dim, 0, piece.shape[dim]).copy_(piece)


def gather_full(param: torch.Tensor, values: Optional[torch.Tensor] = None,
                parallel: Optional[ParallelContext] = None) -> Dict[Optional[str], torch.Tensor]:
    """Every shard of ``param`` as its full checkpoint tensor, on every rank (collective: call on all
    TP ranks of the model's context ``parallel``). ``values``: a tensor laid out like ``param`` to gather
    instead (e.g. its gradient)."""
    values = (param if values is None else values).detach()
    if getattr(param, "shards", None) is None:
        return {None: values}
    local = values.transpose(0, param.partition_dim).contiguous()
    return _full_tensors(param, collectives.all_gather(context_for(parallel), local))


def gather_full_to_first(param: torch.Tensor, values: Optional[torch.Tensor] = None,
                         parallel: Optional[ParallelContext] = None) -> Optional[Dict[Optional[str], torch.Tensor]]:
    """``gather_full`` onto TP rank 0 only; the other ranks send their slices and get None."""
    values = (param if values is None else values).detach()
    p = context_for(parallel)
    if getattr(param, "shards", None) is None:
        return {None: values} if p.rank == 0 else None
    every_rank = collectives.gather_to_first(p, values.transpose(0, param.partition_dim).contiguous())
    return None if every_rank is None else _full_tensors(param, every_rank)


def pieces(param: torch.Tensor) -> List[tuple]:
    """Where this rank's rows of ``param`` sit in its checkpoint tensors, no communication:
    ``(shard name, dim, first full row, rows, first local row)`` per piece along the partition dim (padding
    rows left out); a replicated parameter is one piece of all its rows along dim 0."""
    shards = getattr(param, "shards", None)
    if shards is None:
        return [(None, 0, 0, param.shape[0] if param.dim() else 1, 0)]
    out, offset = [], 0
    for shard in shards:
        out.append((shard.name, param.partition_dim, *_rows_of(param, shard), offset))
        offset += shard.local
    return out


def _rows_of(param: torch.Tensor, shard: Shard) -> tuple:
    """(first full row, rows) of ``shard`` on this rank: its replica group's block, less the padding past the end."""
    start = (param.tp_rank // shard.replicas) * shard.local
    return start, max(0, min(shard.local, shard.full - start))


def full_shapes(param: torch.Tensor) -> Dict[Optional[str], tuple]:
    """The checkpoint shape of every shard of ``param`` (no communication)."""
    shards = getattr(param, "shards", None)
    if shards is None:
        return {None: tuple(param.shape)}
    out = {}
    for shard in shards:
        shape = list(param.shape)
        shape[param.partition_dim] = shard.full
        out[shard.name] = tuple(shape)
    return out


def _full_tensors(param: torch.Tensor, stacked: torch.Tensor) -> Dict[Optional[str], torch.Tensor]:
    """Every rank's local tensor (partition dim first), stacked in rank order -> full tensors by shard."""
    dim, t = param.partition_dim, param.tp_size
    every_rank = stacked.chunk(t, dim=0)
    out, offset = {}, 0
    for shard in param.shards:
        pieces = [every_rank[r][offset:offset + shard.local] for r in range(0, t, shard.replicas)]
        out[shard.name] = torch.cat(pieces, dim=0)[: shard.full].transpose(0, dim).contiguous()
        offset += shard.local
    return out
