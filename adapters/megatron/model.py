"""The core's causal LM as a Megatron model: Megatron's [b, s] batches in, per-token loss (or
vocab-parallel logits) out, like GPTModel. Tokens run s-major ([s, b] viewed as [s*b]), so SP shards
the sequence exactly as Megatron does."""
from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from sp_core.models import CausalLM, ModelConfig, ModelError, load_hf_checkpoint
from sp_core_megatron.batch import (MegatronBatch, context_parallel_batch, document_positions, megatron_attention,
                                    packed_cu_seqlens)
from sp_core_megatron.bind import bind_tensor_parallel_group, parameter_device
from sp_core_megatron.config import check_supported, check_supported_for_model, moe_parallel_mode


def megatron_attention_for(layer_index: int):
    return megatron_attention


class SPCoreGPTModel(MegatronModule):
    """forward(input_ids [b, s], position_ids [b, s], attention_mask, labels [b, s], packed_seq_params)
    -> loss [b, s]; without labels: logits [b, s, ceil(V/t)] over this rank's vocabulary block (as
    GPTModel). ``attention_mask``: Megatron's [b or 1, 1, s, s], True = masked out (None: causal).
    ``packed_seq_params`` (THD, b = 1): documents attend only to themselves and their positions
    restart at 0 (``position_ids`` are then ignored, as Megatron's rotary does). Under context parallelism
    (``context_parallel_size``) the batch is this CP rank's part, as Megatron's ``get_batch_on_this_cp_rank``
    split it ([b, s/cp]; ``position_ids`` the global positions), and so is the loss (as GPTModel's)."""

    def __init__(self, config, pre_process: bool = True, post_process: bool = True, pg_collection=None):
        check_supported(config)
        if not (pre_process and post_process):
            raise ModelError("sp-core does not support pipeline stages yet: build with pre_process=post_process=True")
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        if pg_collection is None:  # Megatron-LM's training loop reads the model's groups (as GPTModel's)
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        self.parallel = bind_tensor_parallel_group(config)
        hf = ModelConfig.from_pretrained(config.sp_core_hf_model, moe_parallel_mode(config))
        check_supported_for_model(config, hf)
        self.hf_config = hf
        with torch.device(parameter_device(config)):
            self.language_model = CausalLM(hf, dtype=config.params_dtype, attention_kernel=megatron_attention_for,
                                           parallel=self.parallel)
        load_hf_checkpoint(self.language_model, config.sp_core_hf_model)

    def set_input_tensor(self, input_tensor) -> None:
        if input_tensor is not None and any(x is not None for x in (input_tensor if isinstance(input_tensor, list)
                                                                      else [input_tensor])):
            raise ModelError("sp-core does not support pipeline stages yet")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """For Megatron's dist_checkpointing: every tensor with its global (Hugging Face) shape."""
        from sp_core_megatron.checkpointing import core_sharded_state_dict

        if sharded_offsets:
            raise ModelError("sp-core does not support pipeline stages yet (sharded_offsets given)")
        return core_sharded_state_dict(self, prefix)

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, packed_seq_params=None,
                **unused):
        b, s = input_ids.shape
        ids = input_ids.t().reshape(-1)
        if self.parallel.cp_size > 1:  # this CP rank's part of each sequence (get_batch_on_this_cp_rank's)
            batch = context_parallel_batch(s, b, self.parallel, input_ids.device, attention_mask, packed_seq_params)
            positions = (position_ids.expand(b, s).t().reshape(-1) if position_ids is not None
                         else batch.key_position[batch.own][: s * b])
            return self._run(ids, positions, batch, labels, s, b)
        cu_seqlens = packed_cu_seqlens(packed_seq_params, b)
        if cu_seqlens is not None:
            positions = document_positions(cu_seqlens, s)
        elif position_ids is not None:
            positions = position_ids.expand(b, s).t().reshape(-1)
        else:
            positions = torch.arange(s, device=input_ids.device).repeat_interleave(b)
        batch = MegatronBatch.from_megatron(s, b, input_ids.device, attention_mask, packed_seq_params,
                                            self.parallel.deterministic)
        return self._run(ids, positions, batch, labels, s, b)

    def _run(self, ids, positions, batch, labels, s: int, b: int):
        with self.parallel.sequence_parallel_for(self.config.sequence_parallel):  # Megatron's config decides
            if labels is None:
                logits = self.language_model.local_logits(ids, positions, batch)
                return logits.unflatten(0, (s, b)).transpose(0, 1)
            loss = self.language_model.loss(ids, positions, batch, labels.t().reshape(-1))
        return loss.view(s, b).t()
