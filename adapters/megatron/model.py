"""The core's causal LM as a Megatron model: Megatron's [b, s] batches in, per-token loss (or
vocab-parallel logits) out, like GPTModel. Tokens run s-major ([s, b] viewed as [s*b]), so SP shards
the sequence exactly as Megatron does."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from sp_core import mpu
from sp_core.layers.attention import expand_kv
from sp_core.models import CausalLM, ModelConfig, ModelError, load_hf_checkpoint
from sp_core_megatron.bind import bind_tensor_parallel_group
from sp_core_megatron.config import check_supported


@dataclass
class SequenceBatch:
    """Megatron's batch: b sequences of s tokens, laid out s-major."""

    seq_length: int
    micro_batch_size: int


def causal_attention_sb(q, k, v, batch: SequenceBatch) -> torch.Tensor:
    """Causal attention within each of the b columns of an [s, b] token grid (rows past s*b: SP padding)."""
    s, b = batch.seq_length, batch.micro_batch_size

    def grid(x):  # [s*b, heads, d] -> [b, heads, s, d]
        return x[: s * b].unflatten(0, (s, b)).permute(1, 2, 0, 3)

    k, v = expand_kv(q, k), expand_kv(q, v)
    out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), is_causal=True)
    out = out.permute(2, 0, 1, 3).flatten(0, 1)
    return torch.cat([out, out.new_zeros((q.shape[0] - s * b,) + tuple(out.shape[1:]))]) if q.shape[0] > s * b else out


class SPCoreGPTModel(MegatronModule):
    """forward(input_ids [b, s], position_ids [b, s], attention_mask, labels [b, s]) -> loss [b, s];
    without labels: logits [b, s, ceil(V/t)] over this rank's vocabulary block (as GPTModel)."""

    def __init__(self, config, pre_process: bool = True, post_process: bool = True):
        check_supported(config)
        if not (pre_process and post_process):
            raise ModelError("sp-core does not support pipeline stages yet: build with pre_process=post_process=True")
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        bind_tensor_parallel_group(config)
        hf = ModelConfig.from_pretrained(config.sp_core_hf_model)
        self.hf_config = hf
        self.language_model = CausalLM(hf, dtype=config.params_dtype)
        for layer in self.language_model.model.layers:
            layer.self_attn.kernel = causal_attention_sb
        load_hf_checkpoint(self.language_model, config.sp_core_hf_model)

    def set_input_tensor(self, input_tensor) -> None:
        if input_tensor is not None and any(x is not None for x in (input_tensor if isinstance(input_tensor, list)
                                                                      else [input_tensor])):
            raise ModelError("sp-core does not support pipeline stages yet")

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, **unused):
        b, s = input_ids.shape
        ids, positions = input_ids.t().reshape(-1), position_ids.t().reshape(-1)
        batch = SequenceBatch(s, b)
        with mpu.sequence_parallel(self.config.sequence_parallel):
            if labels is None:
                logits = self.language_model.local_logits(ids, positions, batch)
                return logits.unflatten(0, (s, b)).transpose(0, 1)
            if torch.is_grad_enabled():
                self.hf_config.check_trainable_tp(mpu.tp_size())
            loss = self.language_model.loss(ids, positions, batch, labels.t().reshape(-1))
        return loss.view(s, b).t()
