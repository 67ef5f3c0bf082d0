"""DeepSeek-V3.2's DSA lightning indexer: for every query row, the ``index_topk`` keys that MLA attends to.

As transformers' ``DeepseekV32Indexer``: q = ``wq_b``(q latent) split into heads, k = ``k_norm``(``wk``(x)),
half-split (neox) rope on the first ``rope_head_dim`` dims of both, and in float32

    score[s, t] = sum_h weights_proj(x)[s, h] * n_heads^-0.5 * relu(q_h[s] . k[t] * head_dim^-0.5),

causal within each sequence of the packed batch (and within the batch's mask where it has one: Megatron's
attention_mask), top-k over the visible keys. The selection is discrete,
so the LM loss gives the indexer no gradient (transformers runs it under no-grad); ``scores`` is the
differentiable form for a loss that trains it (DeepSeek's KL against the attention, inputs detached).

Under SP each rank works on its own token shard: ``wk``, ``k_norm``, the rope and ``weights_proj`` run on
the shard, and the queries come from the shard of the q latent this rank already holds (the rows MLA
gathers for ``q_b_proj``). Only the small key (``head_dim`` values per token) is gathered (g); each rank
scores its own query rows against all keys, and the int32 selection ``[T, k]`` is gathered so that the
head-sharded attention sees every row's keys. All parameters therefore see the token shard and are tagged
``sequence_parallel``. With SP off every rank runs the whole indexer on all tokens (nothing summed).

Under context parallelism the key is gathered over CP too (after the TP gather): each rank scores its own
query rows (its CP part, then its TP shard of it) against every earlier key, so the O(S^2) scoring is
divided by cp·t; the selection holds packed-batch rows (global), gathered over TP only.

Where the keys come from is the ``keys`` object's job (:class:`BatchIndexKeys`): by default the batch's
own rows (a packed batch of whole sequences; the selection holds batch rows). A server that caches keys
per token slot passes its own, whose groups hold a request's cached keys and whose key ids are its slots.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.kernels import batch_invariant
from sp_core.layers.context_parallel import ContextParallelBatch
from sp_core.layers.linear import ReplicatedLinear
from sp_core.layers.norm import LayerNorm
from sp_core.layers.rotary import RotaryEmbedding

K_NORM_EPS = 1e-6  # transformers' DeepseekV32Indexer: nn.LayerNorm(index_head_dim, eps=1e-6)
SCORE_BLOCK_BYTES = 1 << 28  # float32 [rows, heads, keys] per block of query rows in the no-grad selection


class LightningIndexer(torch.nn.Module):
    """``forward(hidden, q_latent, positions, batch)`` -> int32 ``[T, k]`` (all rows) or None.

    hidden / q_latent / positions: this rank's token shard under SP (all tokens otherwise) of the
    attention input, the normed q latent (``q_a_layernorm`` output) and the positions; ``batch`` gives the
    packed sequences' lengths (``seq_lens``, as :class:`PackedBatch`). The result lists,
    for every row of the batch, the indices (rows of the packed batch) of its selected keys, -1 where a
    row sees fewer than k keys; k = min(index_topk, longest sequence). None when no sequence is longer
    than ``index_topk``: every row then keeps all its causal keys, the plain causal attention.
    """

    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_head_dim: int,
                 index_topk: int, rope_theta: float, rope_scaling: Optional[dict] = None,
                 dtype: Optional[torch.dtype] = None, keys: Optional["BatchIndexKeys"] = None):
        super().__init__()
        self.parallel = mpu.context_for()
        self.n_heads, self.head_dim, self.rope_head_dim, self.index_topk = n_heads, head_dim, rope_head_dim, index_topk
        self.keys = keys if keys is not None else BatchIndexKeys()
        self.wq_b = ReplicatedLinear(q_lora_rank, n_heads * head_dim, dtype=dtype)
        self.wk = ReplicatedLinear(hidden_size, head_dim, dtype=dtype)
        self.k_norm = LayerNorm(head_dim, K_NORM_EPS, dtype=dtype)
        # float32 whatever the model's dtype, as transformers keeps it (_keep_in_fp32_modules)
        self.weights_proj = Float32Linear(hidden_size, n_heads, dtype=torch.float32)
        self.rotary = RotaryEmbedding(rope_head_dim, rope_theta, rope_scaling, interleaved=False)

    def _rope(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        roped, rest = x.split([self.rope_head_dim, self.head_dim - self.rope_head_dim], dim=-1)
        return torch.cat([self.rotary.rotate(positions, roped), rest], dim=-1)

    def _keys(self, hidden, positions) -> torch.Tensor:
        """Every row's keys [T, d] (gathered under SP)."""
        k = self._rope(positions, self.k_norm(self.wk(hidden)).unsqueeze(1)).squeeze(1)
        k = mpu.gather_from_sp(k, self.parallel) if self.parallel.sequence_parallel_active else k
        return mpu.gather_from_cp(k, self.parallel)  # every CP rank's keys (identity with cp 1)

    def _projections(self, hidden, q_latent, positions):
        """Own rows' queries [rows, heads, d] and head weights [rows, heads]; every row's keys [T, d]."""
        q = self._rope(positions, self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim)))
        keys = self._keys(hidden, positions)
        weights = self.weights_proj(hidden.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5
        return q, weights, keys

    def _scores(self, q, weights, keys, visible) -> torch.Tensor:
        if self.parallel.deterministic:  # the same scores whatever rows and keys a framework scores together
            scores = batch_invariant.index_scores(q.float(), weights, keys.float(), self.head_dim ** -0.5)
        else:
            logits = torch.einsum("shd,td->sht", q.float(), keys.float()) * self.head_dim ** -0.5
            scores = torch.einsum("sh,sht->st", weights, F.relu(logits))
        return scores.masked_fill(~visible, float("-inf"))

    def scores(self, hidden: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """Index scores of this rank's query rows against every key, float32 ``[rows, T]``, -inf where a key
        is not visible. Differentiable in the indexer's parameters only (the inputs are detached)."""
        q, weights, keys = self._projections(hidden.detach(), q_latent.detach(), positions)
        if isinstance(batch, ContextParallelBatch):
            return self._scores(q, weights, keys, batch.visible(own_rows(batch.rows, self.parallel, q.device)))
        total = keys.shape[0]
        return self._scores(q, weights, keys, batch_visible_keys(batch, total, own_rows(total, self.parallel, q.device)))

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor,
                batch) -> Optional[torch.Tensor]:
        longest = self.keys.longest(batch)
        if longest <= self.index_topk:  # every row keeps all its keys; a cache still stores this batch's
            if self.keys.caches:
                self.keys.store(self._keys(hidden, positions), batch)
            return None
        q, weights, keys = self._projections(hidden, q_latent, positions)
        self.keys.store(keys, batch)
        k = min(self.index_topk, longest)
        selected = torch.full((q.shape[0], k), -1, dtype=torch.int32, device=q.device)
        for group in self.keys.groups(keys, batch, self.parallel):
            group_keys = group.keys.float()
            block = max(1, SCORE_BLOCK_BYTES // (4 * self.n_heads * max(1, group_keys.shape[0])))
            for start in range(0, group.rows.shape[0], block):  # bounds [block, heads, keys] and [block, keys]
                rows, part = group.rows[start:start + block], slice(start, start + block)
                scores = self._scores(q[rows], weights[rows], group_keys, group.visible[part])
                values, index = scores.topk(min(k, scores.shape[1]), dim=-1)
                ids = group.ids[index].to(torch.int32).masked_fill_(values == float("-inf"), -1)
                selected[rows, : ids.shape[1]] = ids
        return mpu.gather_to_replicated(selected, self.parallel) if self.parallel.sequence_parallel_active else selected


class Float32Linear(ReplicatedLinear):
    """A ReplicatedLinear that keeps its dtype through ``.to(dtype)`` / ``.bfloat16()`` / ``.half()`` (what
    Megatron's Float16Module calls on the model) and only follows the device: index-score gaps go down to
    ~7e-4, so bf16 head weights could change the selected keys against transformers."""

    def _apply(self, fn, recurse=True):
        def device_only(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(device_only, recurse)


class KeyGroup(NamedTuple):
    """Query rows (indices into this rank's rows) scored against one set of keys: ``keys`` [N, d],
    ``ids`` [N] (what the selection reports for each key), ``visible`` bool [len(rows), N]."""

    rows: torch.Tensor
    keys: torch.Tensor
    ids: torch.Tensor
    visible: torch.Tensor


class BatchIndexKeys:
    """The indexer's keys are the batch's own (every sequence whole in the batch): one group, this rank's
    query rows against all rows' keys (gathered under SP), causal within each packed sequence; the key ids
    are batch rows. ``longest(batch)``: the longest sequence a query row can see. ``store(keys, batch)``:
    keep this batch's keys [T, d] for later batches (``caches``: whether it does; here nothing is kept)."""

    caches = False

    def store(self, keys: torch.Tensor, batch) -> None:
        pass

    def longest(self, batch) -> int:
        return max(batch.seq_lens, default=0)

    def groups(self, keys: torch.Tensor, batch, parallel) -> Iterator[KeyGroup]:
        if isinstance(batch, ContextParallelBatch):  # keys of every CP rank; ids: packed-batch rows
            rows = own_rows(batch.rows, parallel, keys.device)
            yield KeyGroup(torch.arange(rows.shape[0], device=keys.device), keys, batch.key_global, batch.visible(rows))
            return
        total, device = keys.shape[0], keys.device
        rows = own_rows(total, parallel, device)
        local = torch.arange(rows.shape[0], device=device)
        yield KeyGroup(local, keys, torch.arange(total, device=device), batch_visible_keys(batch, total, rows))


def batch_visible_keys(batch, total: int, rows: torch.Tensor) -> torch.Tensor:
    """bool ``[len(rows), total]``: the keys each query row may select, causal within its sequence and, where
    the batch has a mask beside its sequences (``batch.allowed_keys``: Megatron's attention_mask), within
    what the mask allows: the mask restricts the candidates before top-k, as transformers adds it to the
    scores."""
    visible = visible_keys(sequence_ids(batch, total, rows.device), rows)
    allowed = batch.allowed_keys(rows, total) if hasattr(batch, "allowed_keys") else None
    return visible if allowed is None else visible & allowed


def sequence_ids(batch, total: int, device=None) -> torch.Tensor:
    """[total]: the packed sequence each row of the batch belongs to; -1 for SP padding rows. A framework's
    batch whose rows are laid out otherwise (Megatron's s-major [s, b]) says so with ``batch.sequence_ids``;
    within a sequence, rows must be in position order."""
    if hasattr(batch, "sequence_ids"):
        return batch.sequence_ids(total, device)
    lens = torch.tensor(list(batch.seq_lens), dtype=torch.long, device=device)
    sequence = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
    return F.pad(sequence, (0, total - sequence.shape[0]), value=-1)


def own_rows(total: int, parallel, device=None) -> torch.Tensor:
    """The batch rows of this rank's queries: its token shard under SP, all rows otherwise."""
    index = torch.arange(total, device=device)
    return mpu.scatter_to_sp(index, parallel) if parallel.sequence_parallel_active else index


def visible_keys(sequence: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """bool ``[len(rows), total]``: the keys each query row sees (its own sequence, causal); padding rows
    see nothing."""
    row_sequence = sequence[rows]
    keys = torch.arange(sequence.shape[0], device=sequence.device)
    same_sequence = (row_sequence[:, None] == sequence[None, :]) & (row_sequence[:, None] >= 0)
    return same_sequence & (keys[None, :] <= rows[:, None])
