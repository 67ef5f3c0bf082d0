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
        CP, of this CP rank's rows (``context_parallel_batch``). Token ids are not validated here (a host sync
        per forward): entry points check the prompts (``sp_core.app.prompts.check_prompts``), servers check
        ids on arrival."""
        num_tokens = input_ids.shape[0]
        if self.parallel.cp_size > 1:
            batch = self.context_parallel_batch(batch, input_ids.device)
            mine, num_tokens = batch.local_index, batch.num_tokens
            input_ids, positions = (F.pad(x[mine], (0, batch.rows - num_tokens)) for x in (input_ids, positions))
        elif self.parallel.sequence_parallel_active:
            input_ids, positions = mpu.pad_1d(input_ids, self.parallel), mpu.pad_1d(positions, self.parallel)
        return self.model(input_ids, positions, batch, num_tokens)

    def context_parallel_batch(self, batch, device=None) -> ContextParallelBatch:
        """This CP rank's part of a packed batch (the zig-zag split; rows a multiple of t under SP)."""
        if isinstance(batch, ContextParallelBatch):
            return batch
        p = self.parallel
        return ContextParallelBatch.zigzag(batch.seq_lens, p.cp_rank, p.cp_size,
                                           p.size if p.sequence_parallel_active else 1, device)

    @batch_invariant.when_deterministic
    def local_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """Logits of all T tokens over this rank's vocabulary block: [T, ceil(V/t)] (under CP gathered from
        every CP rank and put back in the batch's order: the exit)."""
        if self.parallel.cp_size > 1:
            batch = self.context_parallel_batch(batch, input_ids.device)
            return self._from_cp_ranks(self.lm_head(self.hidden_states(input_ids, positions, batch)), batch)
        hidden = self.hidden_states(input_ids, positions, batch)
        return self.lm_head(hidden)[: input_ids.shape[0]]

    def _from_cp_ranks(self, rows: torch.Tensor, batch) -> torch.Tensor:
        """This CP rank's per-row results (padded rows) -> every token's, in the packed batch's order."""
        cp_batch = self.context_parallel_batch(batch, rows.device)
        gathered = mpu.gather_from_cp_exit(rows[: cp_batch.rows], self.parallel)
        return gathered.index_select(0, cp_batch.gathered_row_of_token())

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        """Full logits [T, vocab] on every rank (inference)."""
        return gather_vocab(self.local_logits(input_ids, positions, batch), self.config.vocab_size, self.parallel)

    def loss(self, input_ids: torch.Tensor, positions: torch.Tensor, batch, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [T] without gathering the vocabulary (nor, under CP, the logits: each CP
        rank takes its own rows' loss, and only the per-token loss crosses CP ranks)."""
        if self.parallel.cp_size > 1:
            cp_batch = self.context_parallel_batch(batch, input_ids.device)
            hidden = self.hidden_states(input_ids, positions, cp_batch)
            mine = F.pad(labels[cp_batch.local_index], (0, cp_batch.rows - cp_batch.num_tokens))
            logits = self.lm_head(hidden)[: cp_batch.rows]
            losses = vocab_parallel_cross_entropy(logits, mine, self.config.vocab_size, self.parallel)
            return self._from_cp_ranks(losses, batch)
        logits = self.local_logits(input_ids, positions, batch)
        return vocab_parallel_cross_entropy(logits, labels, self.config.vocab_size, self.parallel)
