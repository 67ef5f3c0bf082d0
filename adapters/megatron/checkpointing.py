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

Every parameter is a ``ShardedTensorFactory``, so that the distributed optimizer's legacy
``fully_sharded_model_space`` format can hand it a ``flattened_range`` (this rank's slice of the
flattened local tensor). megatron-core >= 0.14 refuses flat ShardedTensors, so a flat slice is declared
as the few rectangular boxes it covers (``_flat_boxes``), each cut by the pieces above: the same global
tensors, loadable in any format and at any tp.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor, ShardedTensorFactory

from sp_core.models.checkpoint import core_to_hf

Offsets = Sequence[Tuple[int, int, int]]  # Megatron's (prepended axis, offset, size), e.g. the layer index
_FLAT = "flattened_range"  # the built dict's entry telling the merger which flat slice it rebuilds


class _Region(NamedTuple):
    """One declared tensor: a box of this rank's parameter and where it sits in the global tensor."""
    name: str                      # entry in the built dict ("" for a whole parameter)
    key: Callable[[str], str]      # factory key -> this tensor's checkpoint key
    start: Tuple[int, ...]         # box in this rank's tensor
    size: Tuple[int, ...]
    global_shape: Tuple[int, ...]  # without prepended (layer) axes
    global_offset: Tuple[int, ...]
    tp_replica: int


def core_sharded_state_dict(module: torch.nn.Module, prefix: str = "", sharded_offsets: Offsets = ()) -> Dict:
    """``module``'s parameters (core names) as ShardedTensorFactories keyed ``prefix + name``."""
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    tp_rank = module.parallel.rank
    _prepended(sharded_offsets)
    out = {}
    for name, param in module.state_dict(keep_vars=True).items():
        if not isinstance(param, torch.Tensor) or name.endswith("_extra_state"):
            continue
        whole = not getattr(param, "expert_parallel", False) and getattr(param, "shards", None) is None
        if whole:
            regions = [_Region("", lambda key: key, (0,) * param.ndim, tuple(param.shape), tuple(param.shape),
                               (0,) * param.ndim, tp_rank)]
        else:
            regions = (_expert_block_regions(param, name) if getattr(param, "expert_parallel", False)
                       else _piece_regions(param, name))
        out[prefix + name] = ShardedTensorFactory(
            prefix + name, param, _builder(param, regions, sharded_offsets, whole), _merger(param, regions),
            replica_id=(0, tp_rank if whole else 0, dp_rank))
    return out


def _prepended(sharded_offsets: Offsets):
    for axis, _, _ in sharded_offsets:
        if axis >= len(sharded_offsets):
            raise ValueError(f"sharded_offsets {tuple(sharded_offsets)}: only prepended axes are supported")
    return tuple(sharded_offsets)


def _pieces(param):
    """(shard, row offset in this rank's tensor, first global row, rows) for every shard with real rows here."""
    rank, offset = param.tp_rank, 0
    for shard in param.shards:
        start = (rank // shard.replicas) * shard.local
        rows = max(0, min(shard.local, shard.full - start))  # the rest is vocabulary padding
        if rows:
            yield shard, offset, start, rows
        offset += shard.local


def _piece_regions(param, name: str) -> List[_Region]:
    dim, shape, regions = param.partition_dim, tuple(param.shape), []
    for shard, local_offset, start, rows in _pieces(param):
        hf_name = core_to_hf(name, shard.name) if shard.name else name
        # a piece with no HF name of its own (the experts' gate / up) is declared as <name>.<piece>
        suffix = hf_name if hf_name != name else f"{name}.{shard.name}"
        key = (lambda k, suffix=suffix: k[: len(k) - len(name)] + suffix) if shard.name else (lambda k: k)
        regions.append(_Region(shard.name or "", key, _at(shape, dim, local_offset, 0), _at(shape, dim, rows),
                               _at(shape, dim, shard.full), _at(shape, dim, start, 0),
                               param.tp_rank % shard.replicas))
    return regions


def _at(shape, dim: int, value: int, fill=None) -> Tuple[int, ...]:
    """``shape`` (or ``fill`` everywhere) with ``value`` at ``dim``."""
    out = list(shape) if fill is None else [fill] * len(shape)
    out[dim] = value
    return tuple(out)


def _expert_block_regions(param, name: str) -> List[_Region]:
    """Expert parallelism: this rank holds experts [r * E_local, (r + 1) * E_local) of E = E_local * t;
    ``gate_up_proj`` [E, 2I, H] is declared as its gate and up halves."""
    shape = tuple(param.shape)
    halves = {"gate": 0, "up": shape[1] // 2} if name.endswith("gate_up_proj") else {"": 0}
    size = _at(shape, 1, shape[1] // len(halves))
    global_shape = _at(size, 0, shape[0] * param.tp_size)
    return [_Region(piece, (lambda key, piece=piece: f"{key}.{piece}" if piece else key),
                    _at(_at(shape, 0, 0, 0), 1, offset), size, global_shape,
                    _at(shape, 0, param.tp_rank * shape[0], 0), 0)
            for piece, offset in halves.items()]


def _flat_boxes(shape: Sequence[int], begin: int, end: int):
    """Elements [begin, end) of a C-ordered ``shape`` as at most 2 * ndim - 1 boxes
    (first flat index, box start, box size), in flat order."""
    if end <= begin:
        return []
    if len(shape) <= 1:
        return [(begin, (begin,) * len(shape), (end - begin,) * len(shape))]
    inner, rest = math.prod(shape[1:]), tuple(shape[1:])

    def within(row, b, e):
        return [(row * inner + f, (row,) + s, (1,) + z) for f, s, z in _flat_boxes(rest, b, e)]

    first, last = begin // inner, end // inner
    if first == last:
        return within(first, begin % inner, end % inner)
    boxes = []
    if begin % inner:
        boxes += within(first, begin % inner, inner)
        first += 1
    if last > first:
        boxes.append((first * inner, (first,) + (0,) * len(rest), (last - first,) + rest))
    if end % inner:
        boxes += within(last, 0, end % inner)
    return boxes


def _flat_parts(shape, begin: int, end: int, regions: List[_Region]):
    """(region, offset in the flat slice, box start, box size, piece start, piece end) for every piece of the
    flat slice [begin, end) of this rank's tensor that a region covers (vocabulary padding is in none)."""
    for first, start, size in _flat_boxes(shape, begin, end):
        for region in regions:
            lo = tuple(max(s, r) for s, r in zip(start, region.start))
            hi = tuple(min(s + z, r + rz) for s, z, r, rz in zip(start, size, region.start, region.size))
            if all(h > l for l, h in zip(lo, hi)):
                yield region, first - begin, start, size, lo, hi


def _builder(param, regions: List[_Region], sharded_offsets: Offsets, whole: bool):
    lead_shape = tuple(size for _, _, size in sharded_offsets)
    lead_offset = tuple(off for _, off, _ in sharded_offsets)
    shape = tuple(param.shape)

    def declare(region, key, piece, lo, replica_id):
        piece = piece.reshape((1,) * len(lead_shape) + tuple(piece.shape))
        offset = tuple(g + l - r for g, l, r in zip(region.global_offset, lo, region.start))
        return ShardedTensor(region.key(key), piece, piece.dtype, tuple(piece.shape), lead_shape + region.global_shape,
                             lead_offset + offset, axis_fragmentations=None,
                             replica_id=(replica_id[0], region.tp_replica, replica_id[2]))

    def build(key, data, replica_id, flattened_range):
        if flattened_range is None:
            if whole:  # as Megatron declares its own (a regular grid)
                return ShardedTensor.from_rank_offsets(key, data, *sharded_offsets, replica_id=replica_id,
                                                       prepend_axis_num=len(sharded_offsets))
            return {r.name: declare(r, key, data[_box(r.start, r.size)], r.start, replica_id) for r in regions}
        begin, end = flattened_range.start, flattened_range.stop
        if data.ndim != 1 or data.numel() != end - begin or not 0 <= begin <= end <= param.numel():
            raise ValueError(f"{key}: flattened_range {begin}:{end} of a {shape} tensor needs 1-D data of "
                             f"{end - begin} elements within it, got {tuple(data.shape)}")
        built = {_FLAT: LocalNonpersistentObject((begin, end))}
        for i, (region, at, start, size, lo, hi) in enumerate(_flat_parts(shape, begin, end, regions)):
            box = data[at: at + math.prod(size)].view(size)
            piece = box[_box(tuple(l - s for l, s in zip(lo, start)), tuple(h - l for l, h in zip(lo, hi)))]
            built.setdefault(region.name, {})[i] = declare(region, key, piece, lo, replica_id)
        return built

    return build


def _box(start, size):
    return tuple(slice(s, s + z) for s, z in zip(start, size))


def _merger(param, regions: List[_Region]):
    shape = tuple(param.shape)

    def merge(loaded):
        if isinstance(loaded, torch.Tensor):  # a whole parameter, declared as one tensor
            return loaded
        tensors = [t for v in loaded.values() if isinstance(v, dict) for t in v.values()]
        tensors += [v for v in loaded.values() if isinstance(v, torch.Tensor)]
        like = tensors[0] if tensors else torch.zeros(())
        merged = torch.zeros(shape, dtype=like.dtype if tensors else param.dtype, device=like.device)
        if _FLAT not in loaded:
            for r in regions:
                merged[_box(r.start, r.size)] = loaded[r.name].reshape(r.size)
            return merged
        begin, end = loaded[_FLAT]
        for i, (region, _, _, _, lo, hi) in enumerate(_flat_parts(shape, begin, end, regions)):
            merged[_box(lo, tuple(h - l for l, h in zip(lo, hi)))] = loaded[region.name][i].reshape(
                tuple(h - l for l, h in zip(lo, hi)))
        return merged.flatten()[begin:end].clone()

    return merge
