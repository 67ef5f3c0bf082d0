"""Vocabulary-parallel embedding, LM head and cross-entropy.

The vocabulary is split over TP in contiguous blocks of ceil(V / t) rows; the padding rows are zero
and never reach an output (logits of padding columns are dropped, or masked out of the loss).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.layers.linear import ColumnParallelLinear
from sp_core.layers.sharding import Shard, mark_partitioned
from sp_core.mpu import collectives
from sp_core.mpu.platform import amp_backward, amp_forward


def vocab_shard(vocab_size: int, t: int) -> Shard:
    return Shard(None, vocab_size, -(-vocab_size // t))


class VocabParallelEmbedding(torch.nn.Module):
    """Token ids (all tokens) -> embeddings of this rank's token shard (g-bar), or all tokens (f-bar)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: Optional[torch.dtype] = None,
                 parallel: Optional[mpu.ParallelContext] = None):
        super().__init__()
        self.parallel = mpu.context_for(parallel)
        self.vocab_size = vocab_size
        shard = vocab_shard(vocab_size, self.parallel.size)
        self.rows_per_rank = shard.local
        self.weight = torch.nn.Parameter(torch.empty(shard.local, hidden_size, dtype=dtype))
        mark_partitioned(self.weight, 0, [shard], self.parallel)
        torch.nn.init.normal_(self.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        start = self.parallel.rank * self.rows_per_rank
        local_ids = input_ids - start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        partial = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0)
        if self.parallel.sequence_parallel_active:
            return mpu.reduce_scatter_to_sp(partial, self.parallel)
        return mpu.reduce_from_tp(partial, self.parallel)


class ParallelLMHead(ColumnParallelLinear):
    """Hidden states (token shard) -> logits of all tokens over this rank's vocabulary block (g)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: Optional[torch.dtype] = None,
                 parallel: Optional[mpu.ParallelContext] = None):
        torch.nn.Module.__init__(self)
        self.parallel = mpu.context_for(parallel)
        self._make_parameters(hidden_size, [vocab_shard(vocab_size, self.parallel.size)], bias=False, dtype=dtype)
        self.vocab_size = vocab_size

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight


def gather_vocab(logits_local: torch.Tensor, vocab_size: int, parallel: Optional[mpu.ParallelContext] = None
                 ) -> torch.Tensor:
    """[T, V/t] on each rank -> [T, V] on every rank, padding columns dropped (no gradient)."""
    every = collectives.all_gather(mpu.context_for(parallel), logits_local.detach().t().contiguous())
    return every.t()[:, :vocab_size]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """-log softmax(logits)[label] without gathering the vocabulary (three all-reduces of [T])."""

    @staticmethod
    @amp_forward
    def forward(ctx, logits_local, labels, vocab_size, parallel):
        rank = parallel.rank
        rows = logits_local.shape[-1]
        start = rank * rows
        logits = logits_local.float()
        pad_cols = torch.arange(start, start + rows, device=logits.device) >= vocab_size
        logits = logits.masked_fill(pad_cols, float("-inf"))
        row_max = collectives.all_reduce(parallel, logits.max(dim=-1).values, op="max")
        shifted = logits - row_max.unsqueeze(-1)
        local_labels = labels - start
        mine = (local_labels >= 0) & (local_labels < rows)
        picked = shifted.gather(-1, local_labels.clamp(0, rows - 1).unsqueeze(-1)).squeeze(-1)
        picked = collectives.all_reduce(parallel, torch.where(mine, picked, torch.zeros_like(picked)))
        exp = shifted.exp()
        sum_exp = collectives.all_reduce(parallel, exp.sum(dim=-1))
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_labels, mine)
        ctx.input_dtype = logits_local.dtype
        return sum_exp.log() - picked

    @staticmethod
    @amp_backward
    def backward(ctx, grad_loss):
        softmax, local_labels, mine = ctx.saved_tensors
        # d loss / d logit = softmax - onehot(label), the onehot only where this rank owns the label;
        # a scatter instead of indexing by nonzero(mine), which would wait for the device (host sync)
        rows = softmax.shape[-1]
        grad = softmax.scatter_add_(-1, local_labels.clamp(0, rows - 1).unsqueeze(-1),
                                    -mine.unsqueeze(-1).to(softmax.dtype))
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                 parallel: Optional[mpu.ParallelContext] = None) -> torch.Tensor:
    """Per-token loss [T] from vocab-sharded logits [T, V/t] and labels [T] (all tokens on every rank).

    Labels outside [0, vocab_size) fail an asynchronous device assertion (no host sync on a GPU; the
    error surfaces at a later synchronisation point), so a training step never waits on the host."""
    torch._assert_async(((labels >= 0) & (labels < vocab_size)).all(),
                        f"labels must lie in [0, {vocab_size}) (the vocabulary)")
    return _VocabParallelCrossEntropy.apply(logits_local, labels, vocab_size, mpu.context_for(parallel))
