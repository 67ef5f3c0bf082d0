"""Where a rank's parameter rows sit in the checkpoint tensors, named the same at every tp and in both MoE modes:
what an in-memory refit's reshard matches between a trainer and a server laid out differently.

A piece is ``(key, index, dim, start, rows, offset, full)``: the rows ``start .. start + rows`` along ``dim`` of
the checkpoint tensor ``key`` (whose shape is ``full``) sit at rows ``offset ..`` along ``dim`` of the parameter
(of ``param[index]`` when ``index`` is not None). The routed experts are described per expert, under their
Hugging Face names (``...mlp.experts.{e}.gate_proj.weight``): an expert held whole on a rank (expert
parallelism, the rank's block of experts) and one split by intermediate size over TP (rows of gate / up, columns
of down) are then pieces of the same checkpoint tensors along the same dim.
"""
from __future__ import annotations

import re
from typing import List

import torch

from sp_core.layers.sharding import full_shapes, pieces
from sp_core.models.checkpoint import piece_key

_ROUTED = re.compile(r"^(.*\.mlp\.experts\.)(gate_up_proj|down_proj)$")


def refit_pieces(name: str, param: torch.Tensor) -> List[tuple]:
    """Every piece of ``param`` (core name ``name``) on this rank, no communication."""
    routed = _ROUTED.match(name)
    if routed is None:
        shapes = full_shapes(param)
        return [(piece_key(name, shard), None, dim, start, rows, offset, shapes[shard])
                for shard, dim, start, rows, offset in pieces(param)]
    prefix, fused = routed.groups()
    return _expert_pieces(prefix, fused, param)


def _expert_pieces(prefix: str, fused: str, param: torch.Tensor) -> List[tuple]:
    """gate_up [E_local, 2 I_local, H] / down [E_local, H, I_local] as per-expert pieces: gate and up rows
    (dim 0 of [I, H]), down columns (dim 1 of [H, I])."""
    whole = getattr(param, "expert_parallel", False)
    first = param.tp_rank * param.shape[0] if whole else 0
    if fused == "gate_up_proj":
        hidden = param.shape[2]
        if whole:
            inter = param.shape[1] // 2
            split = [("gate", 0, inter, 0), ("up", 0, inter, inter)]
        else:
            inter = param.shards[0].full
            split = [(shard, start, rows, offset) for shard, _, start, rows, offset in pieces(param)]
        return [(f"{prefix}{first + e}.{shard}_proj.weight", e, 0, start, rows, offset, (inter, hidden))
                for e in range(param.shape[0]) for shard, start, rows, offset in split]
    hidden = param.shape[1]
    if whole:
        inter = param.shape[2]
        split = [(0, inter, 0)]
    else:
        inter = param.shards[0].full
        split = [(start, rows, offset) for _, _, start, rows, offset in pieces(param)]
    return [(f"{prefix}{first + e}.down_proj.weight", e, 1, start, rows, offset, (hidden, inter))
            for e in range(param.shape[0]) for start, rows, offset in split]


def refit_keys(name: str, param: torch.Tensor) -> List[str]:
    """The checkpoint tensors ``param`` holds pieces of on any rank of its group (a rank holding whole experts
    holds pieces of its own experts only)."""
    keys = [piece[0] for piece in refit_pieces(name, param)]
    routed = _ROUTED.match(name)
    if routed is None or not getattr(param, "expert_parallel", False):
        return keys
    prefix, fused = routed.groups()
    projections = ("gate", "up") if fused == "gate_up_proj" else ("down",)
    return [f"{prefix}{e}.{p}_proj.weight" for e in range(param.shape[0] * param.tp_size) for p in projections]


def moe_mode(params) -> str:
    """"ep" when the routed experts among ``params`` are held whole per rank (expert parallelism), else "tp"."""
    return "ep" if any(getattr(p, "expert_parallel", False) for p in params) else "tp"
