"""Megatron's batch metadata for the core's attention: b sequences of s tokens laid out s-major
([s, b] viewed as [s*b], so SP shards the sequence as Megatron does), with Megatron's attention mask
(``[b or 1, 1, s, s]``, True = masked out) or packed documents (``PackedSeqParams``, THD: b = 1 and
``cu_seqlens`` marking where each document starts). Everything stays on the device: no host sync."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from sp_core.layers.attention import PackedBatch, expand_kv, packed_causal_attention
from sp_core.layers.context_parallel import ContextParallelBatch
from sp_core.models import ModelError


@dataclass
class MegatronBatch:
    seq_length: int
    micro_batch_size: int
    allowed: Optional[torch.Tensor] = None
    """[b or 1, 1, s, s] bool, True = may attend; None = plain causal attention."""
    document_starts: Optional[torch.Tensor] = None
    """Packed documents (THD, b = 1): ``cu_seqlens``; None otherwise."""
    deterministic: bool = False
    """The model's context is deterministic: attention runs the core's kernel per sequence."""

    @property
    def seq_lens(self):
        """The longest sequence first (what DeepSeek-V3.2's indexer reads to decide whether it selects)."""
        return [self.seq_length] * self.micro_batch_size

    def sequence_ids(self, total: int, device=None) -> torch.Tensor:
        """[total]: which sequence (column b, or packed document) each s-major token row belongs to; -1 for
        SP padding rows. Within one sequence the rows are in position order, so row order is causal order."""
        rows = torch.arange(total, device=device)
        real = rows < self.seq_length * self.micro_batch_size
        if self.document_starts is not None:
            ids = document_index(self.document_starts.to(device), total)
        else:
            ids = rows % self.micro_batch_size
        return torch.where(real, ids, torch.full_like(ids, -1))

    def allowed_keys(self, rows: torch.Tensor, total: int) -> Optional[torch.Tensor]:
        """bool [len(rows), total]: the s-major rows the mask lets each of ``rows`` attend to (what
        DeepSeek-V3.2's indexer may select from); None without a mask. SP padding rows see nothing."""
        if self.allowed is None:
            return None
        s, b = self.seq_length, self.micro_batch_size
        keys = torch.arange(total, device=rows.device)
        grid = self.allowed.to(rows.device).expand(b, 1, s, s)[:, 0]  # [b, s, s]
        r, k = rows.clamp(max=s * b - 1), keys.clamp(max=s * b - 1)
        seen = grid[(r % b)[:, None], (r // b)[:, None], (k // b)[None, :]]
        same_column = (r % b)[:, None] == (k % b)[None, :]
        return seen & same_column & (rows < s * b)[:, None] & (keys < s * b)[None, :]

    @functools.cached_property
    def sequence_lengths(self) -> List[int]:
        """The lengths of the sequences the rows form, column after column (each column's packed documents in
        order; one sequence per column without a mask): what the deterministic mode runs one at a time. Read
        on the host once per batch. A mask must be causal within blocks of consecutive tokens (what Megatron's
        --reset-attention-mask and THD packing build); any other is refused: it has no batch-invariant kernel."""
        s, b = self.seq_length, self.micro_batch_size
        if self.allowed is None:
            return [s] * b
        lengths = []
        for column, grid in enumerate(self.allowed.expand(b, 1, s, s)[:, 0]):
            starts = torch.ones(s, dtype=torch.bool, device=grid.device)
            starts[1:] = ~grid.diagonal(-1)  # a row that may not see the one before it starts a document
            doc = starts.cumsum(0)
            if not torch.equal(grid, (doc[:, None] == doc[None, :]).tril()):
                raise ModelError(f"the deterministic mode takes attention masks that are causal within documents "
                                 f"of consecutive tokens (Megatron's --reset-attention-mask, THD packing); column "
                                 f"{column} of this attention_mask is not")
            bounds = starts.nonzero().squeeze(1).tolist() + [s]
            lengths += [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        return lengths

    @classmethod
    def from_megatron(cls, seq_length: int, micro_batch_size: int, device, attention_mask=None,
                      packed_seq_params=None, deterministic: bool = False) -> "MegatronBatch":
        cu_seqlens = packed_cu_seqlens(packed_seq_params, micro_batch_size)
        if cu_seqlens is None and attention_mask is None:
            return cls(seq_length, micro_batch_size, deterministic=deterministic)
        allowed = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).tril()
        if cu_seqlens is not None:
            doc = document_index(cu_seqlens, seq_length)
            allowed = allowed & (doc.unsqueeze(0) == doc.unsqueeze(1))
        allowed = allowed.view(1, 1, seq_length, seq_length)
        if attention_mask is not None:
            if attention_mask.shape[-2:] != (seq_length, seq_length):
                raise ModelError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                 f"[b or 1, 1, {seq_length}, {seq_length}] (True = masked out)")
            # a row with nothing left to attend to (padding) keeps its diagonal instead of giving NaN
            diagonal = torch.eye(seq_length, dtype=torch.bool, device=device)
            allowed = (allowed & ~attention_mask.bool()) | diagonal
        return cls(seq_length, micro_batch_size, allowed, cu_seqlens, deterministic)


def context_parallel_batch(local_length: int, micro_batch_size: int, parallel, device=None,
                           attention_mask=None, packed_seq_params=None) -> ContextParallelBatch:
    """The core's description of a CP rank's part of b sequences as Megatron's ``get_batch_on_this_cp_rank``
    split them (each sequence of s = cp * ``local_length`` tokens cut into 2·cp chunks, rank i holding chunks
    i and 2cp-1-i), rows s-major ([s/cp, b] viewed as [s/cp * b]); a gathered key's packed-batch row is
    position * b + column, as Megatron's s-major grid numbers it. Causal batches only: Megatron's THD split
    under CP needs Transformer Engine (``get_thd_batch_on_this_cp_rank``), and an attention_mask would have
    to be split over keys as well."""
    if packed_seq_params is not None or attention_mask is not None:
        raise ModelError("sp-core with context_parallel_size > 1 takes causal batches only: no packed sequences "
                         "(THD needs Transformer Engine's CP split) and no attention_mask; use "
                         "context_parallel_size=1 for those")
    return _zigzag_grid(local_length, micro_batch_size, parallel.cp_rank, parallel.cp_size, parallel.size, device)


@functools.lru_cache(maxsize=8)
def _zigzag_grid(local_length: int, b: int, cp_rank: int, cp: int, t: int, device) -> ContextParallelBatch:
    """Built once per shape (every layer of every step reads the same; its blocks are read on the host once)."""
    chunk = local_length // 2
    if local_length % 2:
        raise ModelError(f"a context-parallel rank's sequence part has {local_length} tokens; Megatron's split "
                         f"gives 2 chunks of equal length (seq_length divisible by 2 x context_parallel_size)")
    rows = -(-local_length * b // t) * t  # SP padding (none where Megatron's s splits)
    index = torch.arange(local_length, device=device)
    positions = torch.stack([torch.where(index < chunk, r * chunk + index, (2 * cp - 1 - r) * chunk + index - chunk)
                             for r in range(cp)])  # [cp, s/cp]

    def padded(x):  # [cp, s/cp * b] s-major rows of every CP rank -> [cp * rows], -1 past the real ones
        return F.pad(x, (0, rows - x.shape[1]), value=-1).reshape(-1)

    position = positions.repeat_interleave(b, dim=1)
    sequence = torch.arange(b, device=device).repeat(cp, local_length)
    return ContextParallelBatch([cp * local_length] * b, rows, cp_rank, cp, padded(position * b + sequence),
                                padded(sequence), padded(position))


def packed_cu_seqlens(packed_seq_params, micro_batch_size: int) -> Optional[torch.Tensor]:
    """Document starts (and the end) of a THD batch; padded offsets when Megatron gives them."""
    if packed_seq_params is None:
        return None
    fmt = getattr(packed_seq_params, "qkv_format", "thd") or "thd"
    if fmt != "thd":
        raise ModelError(f"packed_seq_params.qkv_format={fmt!r} is not supported; sp-core takes 'thd'")
    if micro_batch_size != 1:
        raise ModelError(f"packed sequences (THD) need micro batch size 1, as in Megatron; got {micro_batch_size}")
    padded = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
    cu_seqlens = padded if padded is not None else packed_seq_params.cu_seqlens_q
    if cu_seqlens is None:
        raise ModelError("packed_seq_params has no cu_seqlens_q; expected document offsets [0, l1, l1+l2, ...]")
    return cu_seqlens


def document_index(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Which document each token belongs to (tokens past the last offset form one more)."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.to(tokens.dtype), tokens, right=True) - 1


def document_positions(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Positions restarting at 0 in every packed document (as Megatron's rotary does for THD)."""
    doc = document_index(cu_seqlens, num_tokens)
    return torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.to(doc.dtype)[doc]


def selected_keys_grid(topk_indices: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """DeepSeek-V3.2's selection (int32 [rows, k]: for each s-major row the rows it may attend to, -1 for
    none) as a bool mask [b, 1, s, s] over each column's own tokens."""
    total = s * b
    rows = topk_indices[:total].long()
    chosen = torch.zeros(total, total + 1, dtype=torch.bool, device=rows.device)
    chosen.scatter_(1, torch.where(rows >= 0, rows, total), True)
    # [s, b, s, b] -> the (query column == key column) blocks -> [b, s, s]
    per_column = chosen[:, :total].view(s, b, s, b).diagonal(dim1=1, dim2=3).permute(2, 0, 1)
    return per_column.unsqueeze(1)


def megatron_attention(q, k, v, batch: MegatronBatch, scale: Optional[float] = None,
                       topk_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention within each of the b columns of an [s, b] token grid, causal, restricted by the mask or
    the document boundaries when there are any (rows past s*b: SP padding). ``scale``: the softmax scale
    (MLA's); ``topk_indices``: DeepSeek-V3.2's selected keys (attention.py's kernel interface).

    In the deterministic mode a batch runs the core's own kernel on each sequence (each column, or each
    packed document: ``MegatronBatch.sequence_lengths``), laid out one after another, a V3.2 selection
    mapped to rows of that layout: the call the core engine and sglang's prefill make for a prompt of it."""
    if isinstance(batch, ContextParallelBatch):  # this CP rank's rows against every CP rank's keys
        return packed_causal_attention(q, k, v, batch, scale=scale, topk_indices=topk_indices)
    s, b = batch.seq_length, batch.micro_batch_size
    if batch.deterministic:
        return _per_sequence_core_kernel(q, k, v, batch, scale, topk_indices)

    def grid(x):  # [s*b (+ SP padding), heads, d] -> [b, heads, s, d]
        return (x if x.shape[0] == s * b else x[: s * b]).unflatten(0, (s, b)).permute(1, 2, 0, 3)

    k, v = expand_kv(q, k), expand_kv(q, v)
    allowed = batch.allowed
    if topk_indices is not None:
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        selected = selected_keys_grid(topk_indices, s, b) & causal
        allowed = selected if allowed is None else allowed & selected
    if allowed is None:
        out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), attn_mask=allowed, scale=scale)
    out = out.permute(2, 0, 1, 3).flatten(0, 1)
    return torch.cat([out, out.new_zeros((q.shape[0] - s * b,) + tuple(out.shape[1:]))]) if q.shape[0] > s * b else out


def _per_sequence_core_kernel(q, k, v, batch: MegatronBatch, scale: Optional[float],
                              topk_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    s, b = batch.seq_length, batch.micro_batch_size

    def by_sequence(x):  # [s*b, heads, d] s-major -> [b*s, heads, d], each column contiguous
        return x[: s * b].unflatten(0, (s, b)).transpose(0, 1).reshape(s * b, *x.shape[1:])

    sparse = {}
    if topk_indices is not None:  # V3.2: the selected s-major rows as rows of the column-after-column layout
        chosen = by_sequence(topk_indices)
        sparse["topk_indices"] = torch.where(chosen >= 0, chosen % b * s + chosen // b, chosen).to(chosen.dtype)
    out = packed_causal_attention(by_sequence(q), by_sequence(k), by_sequence(v),
                                  PackedBatch(batch.sequence_lengths), scale=scale, **sparse)
    out = out.unflatten(0, (b, s)).transpose(0, 1).reshape(s * b, *out.shape[1:])
    return torch.cat([out, out.new_zeros((q.shape[0] - s * b,) + tuple(out.shape[1:]))]) if q.shape[0] > s * b else out
