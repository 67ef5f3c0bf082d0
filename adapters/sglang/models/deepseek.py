"""DeepSeek V2 / V2-Lite / V3 / V3.2 on sglang: the core's layers, MLA through sglang's attention backend and
its MLA KV pool.

sglang picks the pool by architecture name: ``MLATokenToKVPool``, one row ``[kv_lat | k_pe]``
(kv_lora_rank + qk_rope_head_dim values) per token and layer. Every rank writes the same row: the
latent is gathered (under SP) or computed on all tokens (SP off) before it reaches the cache.

Attention runs in the absorbed form in every forward mode but one: the model builder gives each MLA layer a
``RadixLatentKernel`` (a ``LatentAttentionKernel``) on one ``RadixAttention`` with this rank's heads, head
dim kv_lora + rope, one key head and value dim kv_lora, as sglang's own ``attn_mqa``. sglang's
torch_native backend (the CPU one) reads keys and values back from the pool in extend as well, so the
expanded form (per-head k, v) cannot run there: the pool holds no per-head keys. W_UK / W_UV are this
rank's heads of ``kv_b_proj``, split once after loading (``post_load_weights``). The exception: in the
deterministic mode (``--enable-deterministic-inference``) a prefill batch writes its rows to the pool and
hands each request's whole sequence back to the layer (``cached_sequences``), which up-projects the cached
latents and runs the core's expanded-form kernel, one sequence at a time: the call Megatron makes for that
sequence, so the log-probabilities are training's, bit for bit (the absorbed form regroups the same sums).

V3.2: the kernel also carries the layer's index-key cache (``index_keys.py``); the indexer's selection is
then a set of KV slots per query, and the kernel attends over those slots' rows only. In the deterministic
mode's prefill the selected slots become rows of the sequences read back (``CachedSequences.key_ids``) and
the core's kernel masks the other keys, as Megatron does. sglang's own DSA path (GPU-only) is kept out of
the way at start-up (``options.py``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from sp_core import mpu, settings
from sp_core.layers.mla import CachedSequences, LatentAttentionKernel
from sp_core.models import ModelConfig, ModelError
from sp_core_sglang.attention import cached_requests, write_kv
from sp_core_sglang.index_keys import SglangIndexKeys
from sp_core_sglang.models.causal_lm import SPCoreForCausalLM

KV_POOL_LOG_ENV = "SP_CORE_KV_POOL_LOG"  # tests: each worker appends its KV pool's class and row width


class RadixLatentKernel(LatentAttentionKernel):
    """``LatentAttentionKernel`` on sglang's ``RadixAttention`` in MLA geometry: drops the SP padding rows,
    writes the rows ``[kv_lat | k_pe]`` of the batch's new tokens to the pool, attends over the cached rows.

    V3.2 (``index_keys`` given): with a selection (``topk_indices`` = KV slots, -1 for none), each query
    attends only to the cached rows of its selected slots (gathered from the pool; softmax over them);
    without one (no request longer than index_topk) it is the dense path above."""

    def __init__(self, attn: torch.nn.Module, kv_lora_rank: int, index_keys: Optional[SglangIndexKeys] = None):
        super().__init__()
        self.attn, self.kv_lora_rank, self.index_keys = attn, kv_lora_rank, index_keys
        self.parallel = mpu.context_for()  # the model's, while it is being built

    def forward(self, q: torch.Tensor, row: torch.Tensor, batch, scale: float, topk_indices=None) -> torch.Tensor:
        if abs(scale - self.attn.scaling) > 1e-12 * scale:
            raise ModelError(f"softmax scale {scale} differs from the RadixAttention's {self.attn.scaling}")
        n, padded, heads = batch.num_tokens, q.shape[0], q.shape[1]
        row = row[:n]
        if topk_indices is None:
            out = self.attn(q[:n].reshape(n, -1), row.unsqueeze(1), row[:, : self.kv_lora_rank].contiguous().unsqueeze(1),
                            batch.forward_batch)
        else:
            out = self._sparse(q[:n], row, batch.forward_batch, topk_indices[:n])
        out = out.reshape(n, heads, -1)
        return F.pad(out, (0, 0, 0, 0, 0, padded - n)) if padded > n else out

    def cached_sequences(self, row: torch.Tensor, batch) -> Optional[CachedSequences]:
        """In the deterministic mode's prefill: the batch's rows written to the pool, each request's
        whole sequence read back, with its KV slots (the ids of V3.2's selection; see the module docstring);
        None otherwise."""
        forward_batch = batch.forward_batch
        if not (self.parallel.deterministic and forward_batch.forward_mode.is_extend()):
            return None
        n = batch.num_tokens
        pool = write_kv(self.attn, forward_batch, row[:n].unsqueeze(1), row[:n, : self.kv_lora_rank].unsqueeze(1))
        cache = pool.get_key_buffer(self.attn.layer_id)
        rows, seq_lens, query_rows, key_ids, start = [], [], [], [], 0
        for slots, total, new in cached_requests(forward_batch):
            rows.append(cache[slots].squeeze(1))
            seq_lens.append(total)
            query_rows.append(torch.arange(start + total - new, start + total, device=row.device))
            key_ids.append(slots)
            start += total
        return CachedSequences(torch.cat(rows).to(row.dtype), seq_lens, torch.cat(query_rows), torch.cat(key_ids))

    def _sparse(self, q: torch.Tensor, row: torch.Tensor, forward_batch, slots: torch.Tensor) -> torch.Tensor:
        from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

        pool = get_token_to_kv_pool()
        pool.set_kv_buffer(self.attn, forward_batch.out_cache_loc, row.unsqueeze(1),
                           row[:, : self.kv_lora_rank].unsqueeze(1))
        selected = pool.get_key_buffer(self.attn.layer_id)[slots.clamp(min=0).long()].squeeze(2)  # [n, k, width]
        logits = torch.einsum("thc,tkc->thk", q, selected).float() * self.attn.scaling
        probs = logits.masked_fill((slots < 0).unsqueeze(1), float("-inf")).softmax(-1).to(q.dtype)
        return torch.einsum("thk,tkc->thc", probs, selected[..., : self.kv_lora_rank])


def _radix_latent_kernel(cfg: ModelConfig, layer_id: int, prefix: str) -> RadixLatentKernel:
    """One ``RadixAttention`` per layer in MLA geometry, as sglang's own ``attn_mqa``: this rank's heads, head
    dim kv_lora + rope, one key head, value dim kv_lora."""
    from sglang.srt.layers.radix_attention import RadixAttention

    mla = cfg.mla
    heads = cfg.num_attention_heads // mpu.context_for().size  # divisibility checked by the model config first
    radix = RadixAttention(heads, mla.kv_lora_rank + mla.qk_rope_head_dim, mla.softmax_scale, num_kv_heads=1,
                           layer_id=layer_id, v_head_dim=mla.kv_lora_rank,
                           prefix=f"{prefix}model.layers.{layer_id}.self_attn.attn_mqa")
    index_keys = SglangIndexKeys(layer_id, cfg.indexer.index_head_dim) if cfg.indexer is not None else None
    return RadixLatentKernel(radix, mla.kv_lora_rank, index_keys)


def check_mla_pool(pool, kv_lora_rank: int, rope: int) -> None:
    """The pool sglang allocated must be the MLA latent pool with rows of kv_lora + rope values."""
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    width = getattr(pool, "kv_cache_dim", None)
    if not isinstance(pool, MLATokenToKVPool) or width != kv_lora_rank + rope:
        raise ModelError(f"expected sglang's MLA KV pool with rows of {kv_lora_rank} + {rope} values, "
                         f"got {type(pool).__name__} (row width {width})")
    log = settings.current().kv_pool_log
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {type(pool).__name__} {tuple(pool.get_key_buffer(pool.start_layer).shape)}\n")


class DeepseekForCausalLM(SPCoreForCausalLM):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__(config, quant_config, prefix)
        self._pool_checked = False

    @staticmethod
    def _attention_kernels(cfg: ModelConfig, prefix: str):
        """Layer index -> its ``RadixLatentKernel`` (the absorbed form in every mode), with V3.2's index-key
        cache where the model has an indexer."""
        return lambda layer_id: _radix_latent_kernel(cfg, layer_id, prefix)

    def post_load_weights(self) -> None:
        """W_UK / W_UV of this rank's heads, split from the loaded ``kv_b_proj`` (contiguous copies)."""
        for layer in self.model.layers:
            layer.self_attn.absorb()

    def load_weights(self, weights) -> None:
        super().load_weights(weights)
        self.post_load_weights()

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, get_embedding=False, **unused):
        if not self._pool_checked:
            mla = self.model.layers[0].self_attn
            from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

            check_mla_pool(get_token_to_kv_pool(), mla.kv_lora_rank, mla.rope)
            self._pool_checked = True
        return super().forward(input_ids, positions, forward_batch, input_embeds, get_embedding, **unused)


class DeepseekV2ForCausalLM(DeepseekForCausalLM):
    pass


class DeepseekV3ForCausalLM(DeepseekForCausalLM):
    pass


class DeepseekV32ForCausalLM(DeepseekForCausalLM):
    pass


EntryClass = [DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM]
