"""Multi-head latent attention (DeepSeek V2 / V3): heads split over TP, the small latent gathered.

Under SP (docs/design.md, principle 5, MLA), on this rank's token shard: the down-projections ``q_a_proj`` and
``kv_a_proj_with_mqa`` (replicated weights, gradients summed over TP), their RMSNorms and the rope on the
shared key ``k_pe``. Then ONE g gathers the latent ``[q_lat | kv_lat | k_pe]`` -- q_lora + kv_lora + rope
values per token (2112 for DeepSeek-V3, against 7168 for its hidden state). ``q_b_proj`` and ``kv_b_proj``
are column layers over heads applied to the gathered latent; ``o_proj`` is a row layer (g-bar).
With SP off every rank holds all tokens and the latent passes f instead of g.

``k_pe`` is one key shared by all heads, and each rank uses it for its own heads only, so its gradient is
a per-rank partial: g's backward (reduce-scatter) or f's (all-reduce) sums it exactly once. Megatron-LM
#1699 never sums it; the double count flagged in the review of its fix sums it twice.

V2-Lite (no q_lora): ``q_proj`` is an ordinary column layer on the hidden state (its own g), and the
latent is ``[kv_lat | k_pe]``.

Absorbed form (serving with a latent KV cache): with a ``LatentAttentionKernel`` as its kernel the
attention runs over the cached row ``[kv_lat | k_pe]`` itself, one key head shared by all query heads:
q_nope is multiplied by W_UK (this rank's heads' k_nope rows of ``kv_b_proj``) into the latent space, the
values are kv_lat, and the output goes through W_UV (the heads' v rows). Exactly the expanded attention,
regrouped. A ``LatentAttentionKernel`` may instead hand back the batch's whole sequences from its cache
(``cached_sequences``; sglang's does in the deterministic mode's prefill): the layer then computes the
expanded form over them with the core's kernel, as training computes the same tokens, bit for bit; V3.2's
selection too, as rows of those sequences (the kernel's masked form, training's).

Context parallelism: queries stay on their CP rank; after the TP gather, only ``[kv_lat | k_pe]`` (kv_lora +
rope values per token, 576 for V3) is gathered over CP (``mpu.gather_from_cp``), then up-projected by
``kv_b_proj`` into this rank's heads' keys and values over every CP rank's rows.

V3.2: an ``indexer`` (indexer.py) picks, per query row, the keys the attention may use; it takes the
attention input and this rank's rows of the q latent, and the kernel gets its selection as
``topk_indices`` (none when every sequence is short enough to keep all its keys: V3's attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.layers.attention import AttentionKernel, PackedBatch, packed_causal_attention
from sp_core.layers.context_parallel import over_gathered_state
from sp_core.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, _divide
from sp_core.layers.norm import RMSNorm
from sp_core.layers.rotary import RotaryEmbedding
from sp_core.mpu import collectives
from sp_core.mpu.platform import amp_backward, amp_forward

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps


class _GatheredLatentUp(torch.autograd.Function):
    """g on the latent fused with the up-projections: the token shard of ``[piece_0 | piece_1 | ...]`` ->
    all tokens, each piece multiplied by its weight (``W^T``) or passed through (weight None: k_pe).

    Saves the token shard and re-gathers it in backward, as linear.py's ``_GatheredInputLinear`` does
    (DESIGN principle 6); the backward's one reduce-scatter sums the partial input gradients of every
    piece over TP, k_pe's included.
    """

    @staticmethod
    @amp_forward
    def forward(ctx, latent_shard, widths, parallel, *weights):
        ctx.widths, ctx.parallel = widths, parallel
        ctx.save_for_backward(latent_shard, *weights)
        pieces = collectives.all_gather(parallel, latent_shard).split(widths, dim=-1)
        return tuple(F.linear(x, w) if w is not None else x.contiguous() for x, w in zip(pieces, weights))

    @staticmethod
    @amp_backward
    def backward(ctx, *grads):
        latent_shard, *weights = ctx.saved_tensors
        gathering = collectives.all_gather_start(ctx.parallel, latent_shard)
        rows = grads[0].shape[0] if grads[0] is not None else latent_shard.shape[0] * ctx.parallel.size
        grad_pieces = []
        for g, w, width in zip(grads, weights, ctx.widths):
            if g is None:
                grad_pieces.append(latent_shard.new_zeros(rows, width))
            else:
                grad_pieces.append(g @ w if w is not None else g)
        reducing = collectives.reduce_scatter_start(ctx.parallel, torch.cat(grad_pieces, dim=-1))
        pieces = gathering.wait().split(ctx.widths, dim=-1)
        grad_weights = [None if w is None or g is None else g.t() @ x for g, w, x in zip(grads, weights, pieces)]
        return (reducing.wait(), None, None, *grad_weights)


def gathered_latent_up(parallel, latent: torch.Tensor, widths: List[int], weights: List[Optional[torch.Tensor]]):
    """The latent's pieces over all tokens, up-projected where a weight is given. Under SP ``latent`` is
    the token shard (g); otherwise all tokens (f)."""
    if parallel.sequence_parallel_active:
        return _GatheredLatentUp.apply(latent, list(widths), parallel, *weights)
    pieces = mpu.copy_to_tp(latent, parallel).split(widths, dim=-1)
    return tuple(F.linear(x, w) if w is not None else x for x, w in zip(pieces, weights))


@dataclass
class CachedSequences:
    """A batch's sequences read back from an MLA cache: ``rows`` [R, kv_lora + rope], the rows
    ``[kv_lat | k_pe]`` of every sequence (its cached prefix, then its new tokens), sequence after sequence;
    ``seq_lens`` their lengths; ``query_rows`` [n] (long) where the batch's n tokens sit among them."""

    rows: torch.Tensor
    seq_lens: List[int]
    query_rows: torch.Tensor
    key_ids: Optional[torch.Tensor] = None
    """[R]: each row's id in V3.2's selection (``topk_indices``: the kernel's ``index_keys`` ids, KV slots)."""


class LatentAttentionKernel(torch.nn.Module):
    """``kernel(q [T, heads, kv_lora + rope], row [T, kv_lora + rope], batch, scale, topk_indices=None)
    -> [T, heads, kv_lora]``: attention of every head over the rows ``[kv_lat | k_pe]`` (the MLA cache
    row; values = its first kv_lora columns). An interface only; frameworks supply the kernel. Passing
    one as MLA's ``kernel`` selects the absorbed form.

    ``index_keys``: where V3.2's indexer finds its keys when this kernel serves from a cache (an object
    with indexer.py's ``BatchIndexKeys`` interface, whose key ids are what ``topk_indices`` then holds);
    None: the keys of the batch itself."""

    index_keys = None

    def cached_sequences(self, row: torch.Tensor, batch) -> Optional[CachedSequences]:
        """Stores the batch's new rows ``row`` [T, kv_lora + rope] (SP padding past the batch's tokens) and
        returns its whole sequences from the cache, for the layer to compute the expanded form over them;
        None (this default): the kernel computes the attention itself, in the absorbed form."""
        return None


class MultiHeadLatentAttention(torch.nn.Module):
    """``forward(hidden, positions, batch)``: hidden is this rank's token shard under SP (all tokens
    otherwise), positions cover all tokens (padded to a multiple of t under SP); returns the token shard
    (all tokens with SP off), like ``SelfAttention``.

    Parameter names are transformers' (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` or ``q_proj``,
    ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``; V3.2's ``indexer.*``). ``kernel``
    computes attention over all tokens and this rank's heads: either attention.py's interface (the
    expanded form; q / k head dim qk_nope + qk_rope, v head dim v_head_dim, ``softmax_scale``, and
    ``topk_indices`` with an indexer) or a ``LatentAttentionKernel`` (the absorbed form).
    """

    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, softmax_scale: float,
                 rope_theta: float, rope_scaling: Optional[dict] = None, rope_interleave: bool = True,
                 bias: bool = False, kernel: Union[AttentionKernel, LatentAttentionKernel] = packed_causal_attention,
                 indexer: Optional[torch.nn.Module] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.parallel = mpu.context_for()
        self.num_local_heads = _divide(num_heads, self.parallel.size, "num_attention_heads")
        self.nope, self.rope, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.softmax_scale = softmax_scale
        if q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden_size, num_heads * self.qk_head_dim, dtype=dtype)
            self.latent_widths = [kv_lora_rank, qk_rope_head_dim]
        else:
            self.q_a_proj = ReplicatedLinear(hidden_size, q_lora_rank, bias=bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, num_heads * self.qk_head_dim, dtype=dtype)
            self.latent_widths = [q_lora_rank, kv_lora_rank, qk_rope_head_dim]
        self.q_lora_rank = q_lora_rank
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LATENT_NORM_EPS, dtype=dtype)
        # q_b_proj / kv_b_proj: column layers whose weights gathered_latent_up applies to the one gathered
        # latent (calling their forward would gather again)
        self.kv_b_proj = ColumnParallelLinear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), dtype=dtype)
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, bias=bias, dtype=dtype)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope_theta, rope_scaling, interleaved=rope_interleave)
        self.kernel = kernel
        self.absorbed = isinstance(kernel, LatentAttentionKernel)
        if self.absorbed and self.parallel.cp_size > 1:
            raise ValueError("the absorbed MLA form (a serving latent cache) does not run with context parallelism; "
                             "cp 1 only")
        self.register_buffer("w_uk", None, persistent=False)  # set by absorb() once the weights are loaded
        self.register_buffer("w_uv", None, persistent=False)
        if indexer is not None and q_lora_rank is None:
            raise ValueError("the DSA indexer takes its queries from the q latent: it needs q_lora_rank")
        self.indexer = indexer

    def latent(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[q_lat | kv_lat | k_pe]`` of the tokens in ``hidden`` (normed latents, roped k_pe): the values
        that cross ranks. Its ``[kv_lat | k_pe]`` part is also what an MLA KV cache stores per token."""
        kv_lat, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope], dim=-1)
        k_pe = self.rotary.rotate(positions, k_pe.unsqueeze(1)).squeeze(1)
        pieces = [self.kv_a_layernorm(kv_lat), k_pe]
        if self.q_lora_rank is not None:
            pieces.insert(0, self.q_a_layernorm(self.q_a_proj(hidden)))
        return torch.cat(pieces, dim=-1)

    def absorbed_weights(self):
        """(W_UK [heads, nope, kv_lora], W_UV [heads, v, kv_lora]): this rank's heads of ``kv_b_proj``."""
        w = self.kv_b_proj.weight.unflatten(0, (self.num_local_heads, self.nope + self.v_head_dim))
        return w.split([self.nope, self.v_head_dim], dim=1)

    def absorb(self) -> None:
        """Keep contiguous copies of ``absorbed_weights()`` for the absorbed form (call after loading)."""
        self.w_uk, self.w_uv = (w.contiguous() for w in self.absorbed_weights())

    def _project(self, hidden: torch.Tensor, positions: torch.Tensor, kv_up: Optional[torch.Tensor]):
        """(local positions, the latent shard, q [T, heads, qk_head] with roped q_pe, kv, k_pe): the work both
        forms share. kv is ``kv_b_proj``(kv_lat) with ``kv_up`` its weight, or kv_lat itself with None or
        under CP (where kv_b_proj applies after the CP gather: ``_attend_over_cp``)."""
        p = self.parallel
        local_positions = mpu.scatter_to_sp(positions, p) if p.sequence_parallel_active else positions
        latent = self.latent(hidden, local_positions)
        up = None if p.cp_size > 1 else kv_up  # under CP the latent is up-projected after its CP gather
        if self.q_lora_rank is None:
            kv, k_pe = gathered_latent_up(p, latent, self.latent_widths, [up, None])
            q = self.q_proj(hidden)
        else:
            q, kv, k_pe = gathered_latent_up(p, latent, self.latent_widths, [self.q_b_proj.weight, up, None])
        q_nope, q_pe = q.unflatten(-1, (self.num_local_heads, self.qk_head_dim)).split([self.nope, self.rope], dim=-1)
        return local_positions, latent, q_nope, self.rotary.rotate(positions, q_pe), kv, k_pe

    def _sparse(self, hidden, latent, local_positions, batch) -> dict:
        """V3.2: ``{"topk_indices": ...}`` when the indexer selected keys; empty otherwise."""
        if self.indexer is None:
            return {}
        selected = self.indexer(hidden, latent[:, : self.q_lora_rank], local_positions, batch)
        return {} if selected is None else {"topk_indices": selected}

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        if self.absorbed:
            return self._forward_absorbed(hidden, positions, batch)
        local_positions, latent, q_nope, q_pe, kv, k_pe = self._project(hidden, positions, self.kv_b_proj.weight)
        sparse = self._sparse(hidden, latent, local_positions, batch)
        if self.parallel.cp_size > 1:
            out = self._attend_over_cp(q_nope, q_pe, torch.cat([kv, k_pe], dim=-1), batch, sparse.get("topk_indices"))
        else:
            out = self.attend(q_nope, q_pe, kv, k_pe, batch, **sparse)
        return self.o_proj(out.flatten(-2))

    def _attend_over_cp(self, q_nope, q_pe, row, batch, topk_indices) -> torch.Tensor:
        """``attend`` with keys and values from ``row`` = ``[kv_lat | k_pe]`` of every CP rank's rows: the one
        tensor gathered over CP (kv_lora + rope values per token), up-projected by ``kv_b_proj`` after it."""

        def over(rows, q_nope, q_pe, topk_indices):
            kv_lat, k_pe = rows.split([self.kv_lora_rank, self.rope], dim=-1)
            sparse = {} if topk_indices is None else {"topk_indices": topk_indices}
            return self.attend(q_nope, q_pe, F.linear(kv_lat, self.kv_b_proj.weight), k_pe, batch, **sparse)

        return over_gathered_state(over, row, q_nope, q_pe, topk_indices, parallel=self.parallel)

    def attend(self, q_nope, q_pe, kv, k_pe, batch, kernel: Optional[AttentionKernel] = None, **sparse) -> torch.Tensor:
        """The expanded form's attention of this rank's heads over all tokens, from q_nope / roped q_pe
        [T, heads, nope | rope], the up-projected ``kv`` [T, heads*(nope+v)] and the roped shared key
        ``k_pe`` [T, rope]: [T, heads, v]. ``kernel``: an attention kernel other than the layer's own."""
        heads = self.num_local_heads
        k_nope, v = kv.unflatten(-1, (heads, self.nope + self.v_head_dim)).split([self.nope, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, heads, -1)], dim=-1)
        return (kernel or self.kernel)(q, k, v, batch, scale=self.softmax_scale, **sparse)

    def _attend_cached(self, q_nope, q_pe, cached: CachedSequences, topk_indices=None) -> torch.Tensor:
        """The expanded form over sequences read back from the cache: each cached row up-projected by
        ``kv_b_proj`` (the GEMM training runs on the same latent), the core's kernel over each whole
        sequence, the batch's query rows placed among them (the others zero; their outputs dropped).
        V3.2's selection (``topk_indices``: ``cached.key_ids``) becomes rows of the cached sequences, so the
        kernel masks the same keys as training's (its masked dense form). [T, heads, v], zero past the
        batch's tokens (SP padding)."""
        n, total = cached.query_rows.shape[0], q_nope.shape[0]
        kv_lat, k_pe = cached.rows.split([self.kv_lora_rank, self.rope], dim=-1)
        rows = cached.rows.shape[0]
        q_nope_rows = q_nope.new_zeros((rows,) + tuple(q_nope.shape[1:])).index_copy(0, cached.query_rows, q_nope[:n])
        q_pe_rows = q_pe.new_zeros((rows,) + tuple(q_pe.shape[1:])).index_copy(0, cached.query_rows, q_pe[:n])
        sparse = {} if topk_indices is None else {"topk_indices": _selected_rows(topk_indices[:n], cached)}
        out = self.attend(q_nope_rows, q_pe_rows, F.linear(kv_lat, self.kv_b_proj.weight), k_pe,
                          PackedBatch(cached.seq_lens), kernel=packed_causal_attention, **sparse)[cached.query_rows]
        return F.pad(out, (0, 0, 0, 0, 0, total - n))

    def _forward_absorbed(self, hidden: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """As ``forward``, through the ``LatentAttentionKernel`` (the absorbed form), with the weights
        ``absorb()`` kept (views of ``kv_b_proj``'s weight before it is called)."""
        w_uk, w_uv = self.absorbed_weights() if self.w_uk is None else (self.w_uk, self.w_uv)
        local_positions, latent, q_nope, q_pe, kv_lat, k_pe = self._project(hidden, positions, None)
        row = torch.cat([kv_lat, k_pe], dim=-1)
        sparse = self._sparse(hidden, latent, local_positions, batch)
        cached = self.kernel.cached_sequences(row, batch)
        if cached is not None:
            return self.o_proj(self._attend_cached(q_nope, q_pe, cached, sparse.get("topk_indices")).flatten(-2))
        q_latent = torch.cat([torch.einsum("thn,hnc->thc", q_nope, w_uk), q_pe], dim=-1)
        out = self.kernel(q_latent, row, batch, self.softmax_scale, **sparse)
        return self.o_proj(torch.einsum("thc,hvc->thv", out, w_uv).flatten(-2))


def _selected_rows(topk_indices: torch.Tensor, cached: CachedSequences) -> torch.Tensor:
    """int32 ``[R, k]``: the selection of the batch's query rows (``topk_indices`` [n, k], ids of
    ``cached.key_ids``; -1 none) as rows of the cached sequences, placed at the query rows; -1 elsewhere."""
    ids, order = cached.key_ids.sort()
    wanted = topk_indices.long()
    found = order[torch.searchsorted(ids, wanted.clamp(min=0)).clamp(max=ids.shape[0] - 1)]
    rows = torch.where(wanted >= 0, found, -1).to(torch.int32)
    out = rows.new_full((cached.rows.shape[0], rows.shape[1]), -1)
    return out.index_copy(0, cached.query_rows, rows)
