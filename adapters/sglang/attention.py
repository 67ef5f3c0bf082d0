"""The core's attention kernel on sglang's attention backend and paged KV cache (``RadixAttention``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.layers.attention import PackedBatch, packed_causal_attention


@dataclass(frozen=True)
class SglangBatch:
    """What the core hands down to its attention kernels: sglang's batch and its real token count
    (under SP the kernel sees the token count padded to a multiple of the tp size)."""

    forward_batch: object
    num_tokens: int


class RadixAttentionKernel(torch.nn.Module):
    """``kernel(q, k, v, batch)`` of ``sp_core.layers.SelfAttention``: drops the SP padding rows, runs
    sglang's ``RadixAttention`` on the batch's tokens in batch order, pads the output back.

    In the deterministic mode a prefill (EXTEND) batch writes its keys and values to sglang's KV cache
    and then computes as the core's kernel does (``packed_causal_attention``, one request at a time over
    its whole cached sequence): the same call, on the same shapes, as the core and Megatron make for
    that sequence, so the log-probabilities are those of training, bit for bit. A request's cached
    prefix (radix cache, chunked prefill) is read back from the cache; its query rows are zero and
    dropped. Decode batches keep sglang's backend."""

    def __init__(self, attn: torch.nn.Module):
        super().__init__()
        self.attn = attn
        self.parallel = mpu.context_for()  # the model's, while it is being built

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: SglangBatch) -> torch.Tensor:
        n, padded, heads = batch.num_tokens, q.shape[0], q.shape[1]
        if self.parallel.deterministic and batch.forward_batch.forward_mode.is_extend():
            out = self._as_the_core(q[:n], k[:n], v[:n], batch.forward_batch)
        else:
            out = self.attn(q[:n].reshape(n, -1), k[:n].reshape(n, -1), v[:n].reshape(n, -1), batch.forward_batch)
        out = out.reshape(n, heads, -1)
        return F.pad(out, (0, 0, 0, 0, 0, padded - n)) if padded > n else out

    def _as_the_core(self, q, k, v, forward_batch) -> torch.Tensor:
        pool = write_kv(self.attn, forward_batch, k, v)
        key_cache, value_cache = pool.get_key_buffer(self.attn.layer_id), pool.get_value_buffer(self.attn.layer_id)
        out, start = [], 0
        for slots, total, new in cached_requests(forward_batch):
            rows = q.new_zeros((total,) + tuple(q.shape[1:]))
            rows[total - new:] = q[start:start + new]
            seq = packed_causal_attention(rows, key_cache[slots].to(q.dtype), value_cache[slots].to(q.dtype),
                                          PackedBatch([total]))
            out.append(seq[total - new:])
            start += new
        return torch.cat(out)


def write_kv(attn, forward_batch, k: torch.Tensor, v: torch.Tensor):
    """Writes the batch's new keys and values to sglang's KV pool (what ``RadixAttention`` does before
    attending) and returns the pool."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

    pool = get_token_to_kv_pool()
    pool.set_kv_buffer(attn, KVWriteLoc.for_batch(forward_batch), k, v)
    return pool


def cached_requests(forward_batch):
    """(KV slots of the whole sequence, its length, how many of its tokens are new in this batch) for each
    request of an EXTEND batch, in batch order; its cached prefix comes first."""
    from sglang.srt.model_executor.forward_context import get_req_to_token_pool

    req_to_token = get_req_to_token_pool().req_to_token
    return [(req_to_token[req, :total], total, new)
            for req, total, new in zip(forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist(),
                                       forward_batch.extend_seq_lens.tolist())]
