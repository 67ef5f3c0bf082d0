"""DeepSeek-V3.2's indexer keys cached per token slot of sglang's KV pool, for the core's ``LightningIndexer``.

One buffer per layer, ``[pool rows, index_head_dim]`` in the model dtype, indexed by the same slots as the
MLA latent rows (``forward_batch.out_cache_loc`` on write, ``req_to_token[request, :seq_len]`` on read).
So an extend over a cached prefix and every decode step score their queries against all earlier tokens of
the request, as transformers' ``DynamicIndexedLayer`` cache does. sglang 0.5.23 keeps its own index-K cache
only in ``DSATokenToKVPool`` (fp8 + scales, index_head_dim 128, GPU kernels), which the adapter does not use
(sglang_deepseek.md). The selection's key ids are KV slots: ``RadixLatentKernel`` gathers those rows.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from sp_core.layers.indexer import KeyGroup, own_rows


class SglangIndexKeys:
    """indexer.py's ``BatchIndexKeys`` interface over sglang's batch (``SglangBatch``) and KV slots."""

    caches = True

    def __init__(self, layer_id: int, head_dim: int):
        self.layer_id, self.head_dim = layer_id, head_dim
        self.cache: Optional[torch.Tensor] = None  # allocated on first use, when sglang's pool exists

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

            rows = get_token_to_kv_pool().get_key_buffer(self.layer_id).shape[0]
            self.cache = torch.zeros(rows, self.head_dim, dtype=like.dtype, device=like.device)
        return self.cache

    def longest(self, batch) -> int:
        forward_batch = batch.forward_batch
        seq_lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        return int(seq_lens.max()) if seq_lens.numel() else 0

    def store(self, keys: torch.Tensor, batch) -> None:
        """This batch's keys (all its rows, SP padding last) into their tokens' slots."""
        self._buffer(keys)[batch.forward_batch.out_cache_loc] = keys[: batch.num_tokens]

    def groups(self, keys: torch.Tensor, batch, parallel) -> Iterator[KeyGroup]:
        """Per request: its new rows among this rank's query rows, against the keys of all its tokens."""
        forward_batch, cache = batch.forward_batch, self._buffer(keys)
        rows = own_rows(keys.shape[0], parallel, keys.device)
        first, held = int(rows[0]) if rows.numel() else 0, rows.shape[0]
        seq_lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens.cpu()
        new = forward_batch.extend_seq_lens_cpu or [1] * forward_batch.batch_size  # decode: one row per request
        from sglang.srt.model_executor.forward_context import get_req_to_token_pool

        req_to_token = get_req_to_token_pool().req_to_token
        start = 0
        for i, (seq_len, extend) in enumerate(zip(seq_lens.tolist(), new)):
            lo, hi = max(start, first), min(start + extend, first + held)  # this request's rows that rank holds
            if lo < hi:
                slots = req_to_token[forward_batch.req_pool_indices[i], :seq_len].long()
                query_pos = torch.arange(lo, hi, device=keys.device) - start + (seq_len - extend)
                visible = torch.arange(seq_len, device=keys.device)[None, :] <= query_pos[:, None]
                yield KeyGroup(torch.arange(lo - first, hi - first, device=keys.device), cache[slots], slots, visible)
            start += extend
