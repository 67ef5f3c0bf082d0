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

from sp_core.mpu import collectives, parallel_state as ps


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


def mark_partitioned(param: torch.nn.Parameter, dim: int, shards: List[Shard]) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    param.shards = shards


def mark_sequence_parallel(param: torch.nn.Parameter) -> None:
    """A replicated parameter that sees token shards: its gradient is a partial sum under SP."""
    param.tensor_model_parallel = False
    param.sequence_parallel = True


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
    group_index = ps.tp_rank() // shard.replicas
    start = group_index * shard.local
    piece = full.narrow(dim, min(start, shard.full), max(0, min(shard.local, shard.full - start)))
    target = param.data.narrow(dim, offset, shard.local)
    target.zero_()  # vocabulary padding stays zero
    target.narrow(dim, 0, piece.shape[dim]).copy_(piece)


def gather_full(param: torch.Tensor, values: Optional[torch.Tensor] = None) -> Dict[Optional[str], torch.Tensor]:
    """Every shard of ``param`` as its full checkpoint tensor (collective: call on all TP ranks).
    ``values``: a tensor laid out like ``param`` to gather instead (e.g. its gradient)."""
    values = (param if values is None else values).detach()
    shards = getattr(param, "shards", None)
    if shards is None:
        return {None: values}
    dim, t = param.partition_dim, ps.tp_size()
    local = values.transpose(0, dim).contiguous()
    every_rank = collectives.all_gather(local).chunk(t, dim=0)
    out, offset = {}, 0
    for shard in shards:
        pieces = [every_rank[r][offset:offset + shard.local] for r in range(0, t, shard.replicas)]
        out[shard.name] = torch.cat(pieces, dim=0)[: shard.full].transpose(0, dim).contiguous()
        offset += shard.local
    return out
