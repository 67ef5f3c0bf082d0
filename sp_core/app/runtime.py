"""Running the core on this rank: build + load a model, and compute log-probabilities of prompts."""
from __future__ import annotations

from typing import List, Sequence

import torch

from sp_core.app.prompts import check_prompts
from sp_core.layers import PackedBatch
from sp_core.models import CausalLM, ModelConfig, load_hf_checkpoint
from sp_core.mpu import platform


def load_model(model_dir: str, dtype: torch.dtype = torch.float32, moe_parallel: str = "tp",
               parallel=None) -> CausalLM:
    """moe_parallel: how MoE layers split experts over TP ("tp" or "ep"; ModelConfig.moe_parallel);
    ``parallel``: the model's context (default: the one made last)."""
    cfg = ModelConfig.from_pretrained(model_dir, moe_parallel)
    with torch.device(platform.current_device()):
        model = CausalLM(cfg, dtype=dtype, parallel=parallel)
    load_hf_checkpoint(model, model_dir)
    return model.eval()


def pack(prompts: Sequence[Sequence[int]], device=None):
    """Token ids, positions and the PackedBatch of a ragged batch of prompts."""
    ids = torch.tensor([tok for p in prompts for tok in p], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(len(p), device=device) for p in prompts]) if prompts else ids
    return ids, positions, PackedBatch([len(p) for p in prompts])


def prompt_logprobs(model: CausalLM, prompts: Sequence[Sequence[int]]) -> List[torch.Tensor]:
    """log_softmax of the logits at every position of every prompt (float32, on CPU)."""
    check_prompts(prompts, model.config.vocab_size)  # on the host lists: no device sync
    ids, positions, batch = pack(prompts, platform.current_device())
    logits = model(ids, positions, batch).float()
    return [x.cpu() for x in torch.log_softmax(logits, -1).split([len(p) for p in prompts])]
