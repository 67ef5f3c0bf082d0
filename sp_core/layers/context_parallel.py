"""Context parallelism's batch description: which tokens of a packed batch this CP rank holds, and which
keys each of its rows may attend to once the key state is gathered over CP.

The zig-zag split (Megatron's, load-balanced for causal attention): every sequence of n tokens is cut into
2·cp chunks of ceil(n / 2cp) tokens (the last ones shorter or empty), and CP rank i holds chunks i and
2cp-1-i. A rank's rows are its tokens of every sequence, sequence after sequence, then padding up to
``rows`` (the same on every CP rank, a multiple of t under SP): padding sits only at the end of a rank's
rows, so the layers' "real tokens first" rule (the MoE's ``num_tokens``) holds as without CP.

Queries stay local; what keys and values are computed from is gathered over CP (``mpu.gather_from_cp``:
``cp * rows`` rows, CP rank after CP rank). ``key_global`` names the token of the packed batch each
gathered row holds (-1: padding), so causality (by index within the sequence), V3.2's selected keys (global
rows of the packed batch, as without CP) and the exit's reordering all follow from it. The attention runs
block by block (``blocks``: a sequence's rows at consecutive positions against its keys up to them), so no
[rows, cp*rows] mask is built.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch

from sp_core import mpu
from sp_core.mpu import collectives


class Block(NamedTuple):
    """Query rows of one sequence at consecutive positions (``rows``: this rank's row indices, in position
    order), and the gathered rows of that sequence's keys up to the last of them (``keys``, in position
    order): the rows attend to the keys causally, aligned at the lower right."""

    rows: torch.Tensor
    keys: torch.Tensor


@dataclass(eq=False)
class ContextParallelBatch:
    """``seq_lens``: the packed batch's sequence lengths (global); ``rows``: this rank's rows (padded);
    ``cp_rank`` / ``cp_size``; ``key_global`` [cp*rows]: the packed-batch row each gathered row holds, -1
    for padding; ``key_sequence`` / ``key_position`` [cp*rows]: its sequence (-1: padding) and index in it."""

    seq_lens: Sequence[int]
    rows: int
    cp_rank: int
    cp_size: int
    key_global: torch.Tensor
    key_sequence: torch.Tensor
    key_position: torch.Tensor

    @classmethod
    def zigzag(cls, seq_lens: Sequence[int], cp_rank: int, cp_size: int, multiple: int = 1,
               device=None) -> "ContextParallelBatch":
        """The zig-zag split of a packed batch of ``seq_lens`` over ``cp_size`` ranks; rows padded to a
        multiple of ``multiple`` (the tp size under SP)."""
        held: List[List[int]] = [[] for _ in range(cp_size)]
        sequence, position, offset = [], [], 0
        for j, n in enumerate(seq_lens):
            chunk = -(-n // (2 * cp_size))
            for r in range(cp_size):
                for c in (r, 2 * cp_size - 1 - r):
                    held[r].extend(range(offset + min(c * chunk, n), offset + min((c + 1) * chunk, n)))
            sequence += [j] * n
            position += range(n)
            offset += n
        rows = -(-max(1, max(len(h) for h in held)) // multiple) * multiple
        key_global = torch.tensor([g for h in held for g in h + [-1] * (rows - len(h))], dtype=torch.long,
                                  device=device)
        real = key_global >= 0
        lookup = torch.tensor(sequence + [-1], dtype=torch.long, device=device)
        where = torch.where(real, key_global, -1)
        key_sequence = lookup[where]
        key_position = torch.tensor(position + [-1], dtype=torch.long, device=device)[where]
        return cls(list(seq_lens), rows, cp_rank, cp_size, key_global, key_sequence, key_position)

    @property
    def own(self) -> slice:
        """This rank's block of the gathered rows."""
        return slice(self.cp_rank * self.rows, (self.cp_rank + 1) * self.rows)

    @property
    def local_index(self) -> torch.Tensor:
        """[num_tokens]: the packed-batch rows of this rank's real tokens, in its row order."""
        mine = self.key_global[self.own]
        return mine[mine >= 0]

    @property
    def num_tokens(self) -> int:
        """This rank's real tokens (its first rows)."""
        return int((self.key_global[self.own] >= 0).sum())

    @property
    def total_tokens(self) -> int:
        return int(sum(self.seq_lens))

    def gathered_row_of_token(self) -> torch.Tensor:
        """[total_tokens]: for each token of the packed batch, the gathered row that holds it."""
        real = torch.nonzero(self.key_global >= 0).squeeze(1)
        out = torch.empty(self.total_tokens, dtype=torch.long, device=self.key_global.device)
        return out.index_copy_(0, self.key_global[real], real)

    def visible(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """bool ``[len(rows), cp*rows]``: the gathered keys each of this rank's ``rows`` (default: all) sees,
        its own sequence up to its own index; padding rows see nothing."""
        mine = self.own
        row_sequence, row_position = self.key_sequence[mine], self.key_position[mine]
        if rows is not None:
            row_sequence, row_position = row_sequence[rows], row_position[rows]
        same = (row_sequence[:, None] == self.key_sequence[None, :]) & (row_sequence[:, None] >= 0)
        return same & (self.key_position[None, :] <= row_position[:, None])

    @functools.cached_property
    def blocks(self) -> List[Block]:
        """This rank's rows as attention blocks (the zig-zag gives two per sequence: each attends to its
        sequence's keys up to its own end), read on the host once per batch. Padding rows are in none."""
        own_sequence, own_position = self.key_sequence[self.own].tolist(), self.key_position[self.own].tolist()
        real = (self.key_sequence >= 0).nonzero().squeeze(1)
        order = real[torch.argsort(self.key_sequence[real] * (max(self.seq_lens, default=0) + 1)
                                   + self.key_position[real])]  # gathered rows, sequence by sequence, by position
        starts = [0]
        for n in self.seq_lens:
            starts.append(starts[-1] + n)
        rows = sorted((s, p, r) for r, (s, p) in enumerate(zip(own_sequence, own_position)) if s >= 0)
        blocks, run = [], []
        for s, p, r in rows + [(-1, -1, -1)]:
            if run and (s != run[-1][0] or p != run[-1][1] + 1):
                sequence, last = run[-1][0], run[-1][1]
                blocks.append(Block(torch.tensor([x[2] for x in run], device=self.key_global.device),
                                    order[starts[sequence]: starts[sequence] + last + 1]))
                run = []
            run.append((s, p, r))
        return blocks

    @functools.cached_property
    def _token_sequence_position(self):
        """[total_tokens] each: the sequence and the position of every packed-batch row."""
        real = self.key_global >= 0
        sequence = torch.full((self.total_tokens,), -1, dtype=torch.long, device=self.key_global.device)
        position = torch.zeros_like(sequence)
        sequence[self.key_global[real]] = self.key_sequence[real]
        position[self.key_global[real]] = self.key_position[real]
        return sequence, position

    def selected_positions_mask(self, selected: torch.Tensor, block: Block) -> torch.Tensor:
        """bool [len(block.rows), len(block.keys)]: which of the block's keys (positions 0.. of its sequence)
        each row's selection (packed-batch rows, -1: none) names."""
        sequence, position = self._token_sequence_position
        ids = selected.long().clamp(min=0)
        own = self.key_sequence[block.keys[:1]]
        width = block.keys.shape[0]
        at = torch.where((selected >= 0) & (sequence[ids] == own), position[ids], width).clamp(max=width)
        mask = torch.zeros(selected.shape[0], width + 1, dtype=torch.bool, device=selected.device)
        return mask.scatter_(1, at, True)[:, :width]


class _OverGatheredState(torch.autograd.Function):
    """``fn(gather over CP of state, *inputs)``, saving only this rank's ``state`` and ``inputs`` (DESIGN
    principle 6 for CP: a rank keeps 1/cp of the keys' state, not the gather); the backward re-gathers,
    recomputes ``fn`` (selective recomputation of the attention, as Megatron's core-attention recompute),
    and reduce-scatters the gathered state's gradient over CP. Gradients of parameters used inside ``fn``
    accumulate as in any reentrant recomputation."""

    @staticmethod
    def forward(ctx, fn, parallel, state, *inputs):
        ctx.fn, ctx.parallel = fn, parallel
        ctx.save_for_backward(state, *inputs)
        with torch.no_grad():
            return fn(collectives.all_gather(parallel.cp, state), *inputs)

    @staticmethod
    def backward(ctx, grad):
        state, *inputs = ctx.saved_tensors
        gathered = collectives.all_gather(ctx.parallel.cp, state).requires_grad_(True)
        leaves = [x.detach().requires_grad_(True) if x is not None and x.is_floating_point()
                  and ctx.needs_input_grad[3 + i] else x for i, x in enumerate(inputs)]
        with torch.enable_grad():
            out = ctx.fn(gathered, *leaves)
        torch.autograd.backward(out, grad)
        grad_state = collectives.reduce_scatter(ctx.parallel.cp, gathered.grad)
        return (None, None, grad_state, *[x.grad if x is not None and x is not inputs[i] else None
                                          for i, x in enumerate(leaves)])


def over_gathered_state(fn, state: torch.Tensor, *inputs, parallel) -> torch.Tensor:
    """``fn(g_cp(state), *inputs)``: ``state`` [rows, ...] is what this CP rank's keys and values are
    computed from, gathered over CP (``mpu.gather_from_cp``'s contract: all-gather forward, reduce-scatter of
    the gradient backward); in training only ``state`` and ``inputs`` are saved and the gather and ``fn`` are
    recomputed in backward. Identity gather with cp 1."""
    if parallel.cp_size == 1:
        return fn(state, *inputs)
    if not torch.is_grad_enabled():
        return fn(mpu.gather_from_cp(state, parallel), *inputs)
    return _OverGatheredState.apply(fn, parallel, state, *inputs)
