"""Megatron's distributed checkpoints (``dist_checkpointing``) for the core's parameters.

Every tensor is declared with its Hugging Face (global) shape and this rank's offset in it, so a
checkpoint saved at one tp loads at another: a packed parameter (``qkv_proj`` = q | k | v,
``gate_up_proj`` = gate | up) is declared as its pieces, each under its Hugging Face name; a KV head
held by several ranks (fewer KV heads than t) is one piece with a replica id per holder; vocabulary
padding rows are not saved and load as zeros. Replicated parameters (norms) are one tensor with
replica id (0, tp rank, dp rank), as Megatron declares its own; so are persistent buffers (DeepSeek-V3's
router bias). DeepSeek's routed experts are declared as ``[E, ...]`` tensors (``gate_up_proj`` as its gate
and up pieces) whichever way they are split: by intermediate size over TP, or as whole experts per rank
(expert parallelism: this rank's block of experts along dim 0), so one mode's checkpoint loads in the other.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from sp_core import mpu
from sp_core.models.checkpoint import core_to_hf

Offsets = Sequence[Tuple[int, int, int]]  # Megatron's (prepended axis, offset, size), e.g. the layer index


def core_sharded_state_dict(module: torch.nn.Module, prefix: str = "", sharded_offsets: Offsets = ()) -> Dict:
    """``module``'s parameters (core names) as ShardedTensors / ShardedTensorFactories keyed ``prefix + name``."""
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    out = {}
    for name, param in module.state_dict(keep_vars=True).items():
        if not isinstance(param, torch.Tensor) or name.endswith("_extra_state"):
            continue
        key = prefix + name
        if getattr(param, "expert_parallel", False):
            out[key] = ShardedTensorFactory(key, param, _expert_block_builder(param, name, sharded_offsets, dp_rank),
                                            _expert_block_merger(param, name), replica_id=(0, 0, dp_rank))
        elif getattr(param, "shards", None) is None:
            out[key] = ShardedTensor.from_rank_offsets(
                key, param, *_prepended(sharded_offsets), replica_id=(0, mpu.tp_rank(), dp_rank),
                prepend_axis_num=len(sharded_offsets))
        else:
            out[key] = ShardedTensorFactory(key, param, _piece_builder(param, prefix, name, sharded_offsets, dp_rank),
                                            _piece_merger(param), replica_id=(0, 0, dp_rank))
    return out


def _prepended(sharded_offsets: Offsets):
    for axis, _, _ in sharded_offsets:
        if axis >= len(sharded_offsets):
            raise ValueError(f"sharded_offsets {tuple(sharded_offsets)}: only prepended axes are supported")
    return tuple(sharded_offsets)


def _pieces(param):
    """(shard, row offset in this rank's tensor, first global row, rows) for every shard with real rows here."""
    rank, offset = mpu.tp_rank(), 0
    for shard in param.shards:
        start = (rank // shard.replicas) * shard.local
        rows = max(0, min(shard.local, shard.full - start))  # the rest is vocabulary padding
        if rows:
            yield shard, offset, start, rows
        offset += shard.local


def _layer_axes(sharded_offsets: Offsets) -> int:
    """How many axes Megatron prepends (0, or 1: the layer); more are refused."""
    if len(sharded_offsets) > 1:
        raise ValueError(f"sharded_offsets {tuple(sharded_offsets)}: at most one prepended axis (the layer) is supported")
    return len(sharded_offsets)


def _refuse_flattened_range(flattened_range) -> None:
    if flattened_range is not None:
        raise ValueError("sp-core's checkpoint pieces do not support flattened ranges (distributed optimizer)")


def _piece_builder(param, prefix: str, name: str, sharded_offsets: Offsets, dp_rank: int):
    dim, lead = param.partition_dim, _layer_axes(sharded_offsets)

    def build(key, data, replica_id, flattened_range):
        _refuse_flattened_range(flattened_range)
        built = {}
        for shard, local_offset, start, rows in _pieces(param):
            # the layer axis as a leading dim of size 1 (prepend_axis_num is for regular grids only;
            # a padded vocabulary makes the grid irregular)
            piece = data.narrow(dim, local_offset, rows).unsqueeze(0) if lead else data.narrow(dim, local_offset, rows)
            global_shape = [size for _, _, size in sharded_offsets] + list(piece.shape[lead:])
            global_shape[lead + dim] = shard.full
            global_offset = [off for _, off, _ in sharded_offsets] + [0] * (piece.ndim - lead)
            global_offset[lead + dim] = start
            hf_name = core_to_hf(name, shard.name) if shard.name else name
            # a piece with no HF name of its own (the experts' gate / up) is declared as <name>.<piece>
            piece_key = key[: len(key) - len(name)] + (hf_name if hf_name != name else f"{name}.{shard.name}")
            piece_key = piece_key if shard.name else key
            built[shard.name or ""] = ShardedTensor(
                piece_key, piece, piece.dtype, tuple(piece.shape), tuple(global_shape), tuple(global_offset),
                axis_fragmentations=None, replica_id=(0, mpu.tp_rank() % shard.replicas, dp_rank))
        return built

    return build


def _piece_merger(param):
    dim, shape = param.partition_dim, tuple(param.shape)

    def merge(loaded):
        pieces = list(loaded.values())
        merged = torch.zeros(shape, dtype=pieces[0].dtype, device=pieces[0].device) if pieces else torch.zeros(shape)
        for shard, local_offset, _, rows in _pieces(param):
            target = merged.narrow(dim, local_offset, rows)
            target.copy_(loaded[shard.name or ""].reshape(target.shape))
        return merged

    return merge


def _expert_pieces(name: str, data: torch.Tensor):
    """piece name -> view: the experts' gate_up_proj [E, 2I, H] as gate and up, down_proj whole."""
    if name.endswith("gate_up_proj"):
        gate, up = data.chunk(2, dim=1)
        return {"gate": gate, "up": up}
    return {None: data}


def _expert_block_builder(param, name: str, sharded_offsets: Offsets, dp_rank: int):
    """Expert parallelism: this rank holds experts [r * E_local, (r + 1) * E_local) of E = E_local * t."""
    lead = _layer_axes(sharded_offsets)

    def build(key, data, replica_id, flattened_range):
        _refuse_flattened_range(flattened_range)
        local = data.shape[0]
        built = {}
        for piece_name, piece in _expert_pieces(name, data).items():
            piece = piece.unsqueeze(0) if lead else piece
            global_shape = [size for _, _, size in sharded_offsets] + [local * mpu.tp_size()] + list(piece.shape[lead + 1:])
            global_offset = [off for _, off, _ in sharded_offsets] + [mpu.tp_rank() * local] + [0] * (piece.ndim - lead - 1)
            built[piece_name or ""] = ShardedTensor(
                f"{key}.{piece_name}" if piece_name else key, piece, piece.dtype, tuple(piece.shape),
                tuple(global_shape), tuple(global_offset), axis_fragmentations=None, replica_id=(0, 0, dp_rank))
        return built

    return build


def _expert_block_merger(param, name: str):
    shape = tuple(param.shape)

    def merge(loaded):
        if name.endswith("gate_up_proj"):
            half = (shape[0], shape[1] // 2, shape[2])
            return torch.cat([loaded["gate"].reshape(half), loaded["up"].reshape(half)], dim=1)
        return loaded[""].reshape(shape)

    return merge
