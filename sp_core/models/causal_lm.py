"""The causal-LM wrapper: owns the two edges of the sequence-parallel (and context-parallel) region.

Entry: pad the token ids (and positions) to a multiple of t; the vocab-parallel embedding then hands
each rank its token shard. Exit: the LM head gathers the tokens (g); padding rows are dropped here.
Under CP the entry first keeps this CP rank's tokens (the zig-zag split, ``ContextParallelBatch``, which
the layers receive as the batch), and the exit gathers the per-token results over CP into the batch's order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.kernels import batch_invariant
from sp_core.layers import ParallelLMHead, gather_vocab, vocab_parallel_cross_entropy
from sp_core.layers.context_parallel import ContextParallelBatch
from sp_core.models.config import ModelConfig
from sp_core.models.deepseek import DeepseekModel
from sp_core.models.qwen import QwenModel
from sp_core.models.stack import KernelForLayer, packed_causal_attention_for

_BODIES = {"Qwen2ForCausalLM": QwenModel, "Qwen3ForCausalLM": QwenModel, "Qwen3MoeForCausalLM": QwenModel,
           "Qwen2MoeForCausalLM": QwenModel,
           "DeepseekV2ForCausalLM": DeepseekModel, "DeepseekV3ForCausalLM": DeepseekModel,
           "DeepseekV32ForCausalLM": DeepseekModel}


class CausalLM(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: Optional[torch.dtype] = None,
                 attention_kernel: KernelForLayer = packed_causal_attention_for,
                 parallel: Optional[mpu.ParallelContext] = None):
        """``attention_kernel(layer_index)``: the attention kernel of each decoder layer (default: the
        core's packed causal attention over ``PackedBatch``); a framework passes its own. ``parallel``: this
        model's context, which every layer keeps (default: the one made last, ``mpu.default_context``)."""
        super().__init__()
        self.parallel = mpu.context_for(parallel)
        cfg.check_tp(self.parallel.size)
        self.config = cfg
        with mpu.building(self.parallel):
            self.model = _BODIES[cfg.architecture](cfg, dtype=dtype, attention_kernel=attention_kernel)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @batch_invariant.when_deterministic
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """Final-norm hidden states: this rank's token shard (padded) under SP, all tokens otherwise; under
        CP, of this CP rank's rows only. Token ids are not validated here (a host sync per forward): entry
        points check the prompts (``sp_core.app.prompts.check_prompts``), servers check ids on arrival.

        Under CP, ``batch`` is either the whole packed batch (the tokens of every sequence: this rank keeps its
        zig-zag part, ``context_parallel_batch``) or a ``ContextParallelBatch`` already, whose caller passed
        only this CP rank's tokens (Megatron's ``get_batch_on_this_cp_rank`` split them)."""
        return self._enter(input_ids, positions, batch)[0]

    def _enter(self, input_ids: torch.Tensor, positions: torch.Tensor, batch):
        """(hidden states, the batch the layers saw, whether the tokens were split here: the exit then
        gathers the results over CP)."""
        p, split_here = self.parallel, False
        if p.cp_size > 1 and not isinstance(batch, ContextParallelBatch):
            batch, split_here = self.context_parallel_batch(batch, input_ids.device), True
            input_ids, positions = input_ids[batch.local_index], positions[batch.local_index]
        if isinstance(batch, ContextParallelBatch):
            num_tokens = batch.num_tokens
            input_ids, positions = (F.pad(x, (0, batch.rows - x.shape[0])) for x in (input_ids, positions))
        else:
            num_tokens = input_ids.shape[0]
            if p.sequence_parallel_active:
                input_ids, positions = mpu.pad_1d(input_ids, p), mpu.pad_1d(positions, p)
        return self.model(input_ids, positions, batch, num_tokens), batch, split_here

    def context_parallel_batch(self, batch, device=None) -> ContextParallelBatch:
        """This CP rank's part of a packed batch (the zig-zag split; rows a multiple of t, SP on or off, so that
        both run the same shapes)."""
        p = self.parallel
        return ContextParallelBatch.zigzag(batch.seq_lens, p.cp_rank, p.cp_size, p.size, device)

    @batch_invariant.when_deterministic
    def local_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """Logits of the T tokens given over this rank's vocabulary block: [T, ceil(V/t)] (under CP with the
        whole batch given, gathered from every CP rank in the batch's order: the exit)."""
        hidden, batch, split_here = self._enter(input_ids, positions, batch)
        logits = self.lm_head(hidden)
        return self._from_cp_ranks(logits, batch) if split_here else logits[: input_ids.shape[0]]

    def _from_cp_ranks(self, rows: torch.Tensor, cp_batch: ContextParallelBatch) -> torch.Tensor:
        """This CP rank's per-row results (padded rows) -> every token's, in the packed batch's order."""
        gathered = mpu.gather_from_cp_exit(rows[: cp_batch.rows], self.parallel)
        return gathered.index_select(0, cp_batch.gathered_row_of_token())

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """Full logits [T, vocab] on every rank (inference)."""
        return gather_vocab(self.local_logits(input_ids, positions, batch), self.config.vocab_size, self.parallel)

    @batch_invariant.when_deterministic
    def loss(self, input_ids: torch.Tensor, positions: torch.Tensor, batch, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [T] without gathering the vocabulary (nor, under CP, the logits: each CP
        rank takes its own rows' loss, and with the whole batch given only the per-token loss crosses CP)."""
        hidden, batch, split_here = self._enter(input_ids, positions, batch)
        if split_here:
            mine = F.pad(labels[batch.local_index], (0, batch.rows - batch.num_tokens))
            losses = vocab_parallel_cross_entropy(self.lm_head(hidden)[: batch.rows], mine, self.config.vocab_size,
                                                  self.parallel)
            return self._from_cp_ranks(losses, batch)
        logits = self.lm_head(hidden)[: input_ids.shape[0]]
        return vocab_parallel_cross_entropy(logits, labels, self.config.vocab_size, self.parallel)
