"""Grouped-query self-attention over TP-sharded heads, with a pluggable attention kernel.

The kernel is ``kernel(q [T, heads, d], k [T, kv_heads, d], v [T, kv_heads, d_v], batch, scale=None)
-> [T, heads, d_v]`` over all tokens of the batch (after the column layer's gather). ``batch`` is whatever
the framework passes down (the default kernel takes :class:`PackedBatch`); rows past the batch's tokens
are SP padding. ``scale`` is the softmax scale (None: d^-0.5); MLA passes its own (YaRN's mscale) and a
value head dim d_v different from the query / key head dim d. ``topk_indices`` (DeepSeek-V3.2's sparse MLA,
passed only when the DSA indexer selected keys): int32 ``[T, k]``, for every row the rows of the batch it
may attend to (-1: none); a kernel that cannot take it need not accept the argument.

Under context parallelism the batch is a ``ContextParallelBatch``: q holds this CP rank's rows, k and v
the rows of every CP rank (gathered over CP by the layer, ``mpu.gather_from_cp``), and the batch says which
keys each row sees (causal by index within its sequence; ``topk_indices`` are packed-batch rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from sp_core import mpu
from sp_core.layers.context_parallel import ContextParallelBatch, over_gathered_state
from sp_core.layers.linear import ColumnParallelLinear, RowParallelLinear
from sp_core.layers.norm import RMSNorm
from sp_core.layers.rotary import RotaryEmbedding
from sp_core.layers.sharding import Shard


@dataclass
class PackedBatch:
    """Variable-length sequences packed along the token dim, each attending causally to itself."""

    seq_lens: Sequence[int]


def expand_kv(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Repeat KV heads to the query heads ([T, heads, d]); SDPA's enable_gqa would rule out its
    flash / memory-efficient kernels and fall back to materialising T x T scores."""
    return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1) if kv.shape[1] != q.shape[1] else kv


AttentionKernel = Callable[..., torch.Tensor]  # (q, k, v, batch, scale=None) -> out: see the module docstring


def packed_causal_attention(q, k, v, batch: PackedBatch, scale: Optional[float] = None,
                            topk_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    k, v = expand_kv(q, k), expand_kv(q, v)
    if isinstance(batch, ContextParallelBatch):
        return context_parallel_attention(q, k, v, batch, scale, topk_indices)
    lens: List[int] = list(batch.seq_lens)
    padding = q.shape[0] - sum(lens)
    if padding > 0:
        lens.append(padding)
    outs, start = [], 0
    for i, (qs, ks, vs) in enumerate(zip(q.split(lens), k.split(lens), v.split(lens))):
        n = lens[i]
        # a sequence no longer than k keeps every causal key; padding rows attend among themselves
        sparse = topk_indices is not None and i < len(batch.seq_lens) and n > topk_indices.shape[1]
        mask = selected_keys_mask(topk_indices[start:start + n], start) if sparse else None
        # [1, heads, T, d]: the fused (flash / memory-efficient) kernels take 4-D inputs only
        out = F.scaled_dot_product_attention(*(x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs)),
                                             attn_mask=mask, is_causal=mask is None, scale=scale)
        outs.append(out.squeeze(0).transpose(0, 1))
        start += n
    return torch.cat(outs)


def context_parallel_attention(q, k, v, batch: ContextParallelBatch, scale: Optional[float] = None,
                               topk_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This CP rank's rows (q) over every CP rank's keys (k, v: gathered), block by block (``batch.blocks``:
    the rows of a sequence at consecutive positions against that sequence's keys up to them, causal at the
    lower right; no mask is materialised without a V3.2 selection, which narrows each block's keys). Padding
    rows get zeros."""
    out = q.new_zeros(q.shape[:2] + v.shape[2:])
    for block in batch.blocks:
        qs, ks, vs = q[block.rows], k[block.keys], v[block.keys]
        n, m = qs.shape[0], ks.shape[0]
        if topk_indices is None:
            mask = causal_lower_right(n, m)
        else:  # the selected keys (packed-batch rows) as positions among this block's keys
            mask = batch.selected_positions_mask(topk_indices[block.rows], block) & \
                torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        o = F.scaled_dot_product_attention(*(x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs)),
                                           attn_mask=mask, scale=scale)
        out = out.index_copy(0, block.rows, o.squeeze(0).transpose(0, 1))
    return out


def selected_keys_mask(indices: torch.Tensor, start: int) -> torch.Tensor:
    """bool [n, n] for one sequence of n rows starting at batch row ``start``: True where the row selected
    the key (``indices``: [n, k] batch rows, -1 for none), and never a later key."""
    n = indices.shape[0]
    local = torch.where(indices >= 0, indices.long() - start, n)  # -1 -> a spare column, dropped below
    mask = torch.zeros(n, n + 1, dtype=torch.bool, device=indices.device).scatter_(1, local, True)[:, :n]
    return mask & torch.ones(n, n, dtype=torch.bool, device=indices.device).tril()


def head_split(num_heads: int, num_kv_heads: int, head_dim: int, t: int):
    """(q shard, kv shard) of a fused qkv projection over ``t`` ranks; KV heads are replicated when fewer than t."""
    if num_heads % t != 0:
        raise ValueError(f"num_attention_heads ({num_heads}) is not divisible by the tensor-parallel size {t}")
    if num_kv_heads >= t:
        if num_kv_heads % t != 0:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) is not divisible by the tensor-parallel size {t}")
        kv_local, replicas = num_kv_heads // t, 1
    else:
        if t % num_kv_heads != 0:
            raise ValueError(f"tensor-parallel size {t} is not a multiple of num_key_value_heads ({num_kv_heads})")
        kv_local, replicas = 1, t // num_kv_heads
    q = Shard("q", num_heads * head_dim, num_heads // t * head_dim)
    kv = [Shard(n, num_kv_heads * head_dim, kv_local * head_dim, replicas) for n in ("k", "v")]
    return [q] + kv


class SelfAttention(torch.nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float, rope_scaling: Optional[dict] = None, qkv_bias: bool = False,
                 qk_norm: bool = False, eps: float = 1e-6, dtype: Optional[torch.dtype] = None,
                 kernel: AttentionKernel = packed_causal_attention):
        super().__init__()
        self.parallel = mpu.context_for()
        shards = head_split(num_heads, num_kv_heads, head_dim, self.parallel.size)
        self.head_dim = head_dim
        self.q_heads, self.kv_heads = shards[0].local // head_dim, shards[1].local // head_dim  # on this rank
        self.qkv_proj = ColumnParallelLinear.packed(hidden_size, shards, bias=qkv_bias, dtype=dtype)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, eps, per_head_on_tp_shard=True, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps, per_head_on_tp_shard=True, dtype=dtype) if qk_norm else None
        self.rotary = RotaryEmbedding(head_dim, rope_theta, rope_scaling)
        self.kernel = kernel

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        heads = self.qkv_proj(hidden).unflatten(-1, (-1, self.head_dim))  # [T, q + k + v heads, d]: one view
        q, k, v = heads.split([self.q_heads, self.kv_heads, self.kv_heads], dim=-2)
        q, k = self.rotary(positions, q, k, self.q_norm, self.k_norm)
        if self.parallel.cp_size > 1:  # this TP rank's K/V heads of every CP rank's rows, in one gather
            width = k.shape[-1]
            out = over_gathered_state(lambda kv, q: self.kernel(q, *kv.split([width, kv.shape[-1] - width], -1), batch),
                                      torch.cat([k, v], dim=-1), q, parallel=self.parallel)
        else:
            out = self.kernel(q, k, v, batch)
        return self.o_proj(out.flatten(-2))
