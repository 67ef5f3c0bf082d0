"""Export a model trained in Megatron to a Hugging Face checkpoint: one writer (TP rank 0 of
data-parallel rank 0); the other TP ranks of that replica send their slices; other replicas skip."""
from __future__ import annotations

from typing import List

from megatron.core import parallel_state

from sp_core.models.checkpoint import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint


def export_hf_checkpoint(model, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                         progress=None) -> List[str]:
    """Call on every rank. ``model``: an SPCoreGPTModel, or Megatron's DDP / Float16Module wrapping one.
    Returns the files written (only on the writer). Sharded past ``max_shard_bytes``, with an index."""
    while not hasattr(model, "language_model") and hasattr(model, "module"):
        model = model.module
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
        return []  # a replica of the same weights: its TP group takes no part
    return save_hf_checkpoint(model.language_model, out_dir, max_shard_bytes=max_shard_bytes, progress=progress)
