"""The MoE router (DeepSeek, Qwen2-MoE, Qwen3-MoE): which experts each token goes to, and with what weight.

Runs on the tokens this rank holds (its SP token shard), so the gate weight sees a token shard and is
tagged ``sequence_parallel`` (gradient summed over TP). Logits are computed in float32 from upcast
inputs, as transformers does; ``e_score_correction_bias`` is a float32 buffer whatever the model dtype.

    method                 scores   groups ranked by        weights
    greedy (V2)            softmax  -                       top-k scores
    group_limited_greedy   softmax  max of the group        top-k scores in the best topk_group groups
    noaux_tc (V3)          sigmoid  sum of the group's top2 unbiased scores of the top-k of score+bias,
                                    of score + bias         renormalised if norm_topk_prob
    softmax (Qwen MoE)     softmax  -                       top-k scores, renormalised if norm_topk_prob
All weights are then multiplied by ``routed_scaling_factor``. transformers' V2 router ignores
``norm_topk_prob``, and so do V2's methods (greedy, group_limited_greedy) here; Qwen's honours it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from sp_core.kernels import batch_invariant
from sp_core.layers.sharding import mark_sequence_parallel

_FLOAT32_BUFFERS = ("e_score_correction_bias", "local_tokens_per_expert")
METHODS = ("greedy", "group_limited_greedy", "noaux_tc", "softmax")


@dataclass(frozen=True)
class RouterConfig:
    """The routing of one MoE layer, from the model config: ``topk_method`` is V2's field of that name
    (``greedy`` / ``group_limited_greedy``), ``noaux_tc`` for V3 / V3.2 (which have no such field) or
    ``softmax`` for Qwen2-MoE / Qwen3-MoE (V2's greedy, but ``norm_topk_prob`` honoured).
    ``n_group`` / ``topk_group`` matter to the grouped methods only."""

    num_experts: int
    top_k: int
    topk_method: str
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.topk_method not in METHODS:
            raise ValueError(f"topk_method {self.topk_method!r} is not supported; supported: {', '.join(METHODS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be between 1 and n_routed_experts "
                             f"({self.num_experts})")
        if not self.grouped:
            return
        if self.n_group < 1 or self.num_experts % self.n_group != 0:
            raise ValueError(f"n_group ({self.n_group}) must divide n_routed_experts ({self.num_experts})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})")
        per_group = self.num_experts // self.n_group
        if self.topk_method == "noaux_tc" and per_group < 2:
            raise ValueError(f"noaux_tc routing (V3) ranks groups by their top-2 experts: needs >= 2 experts per "
                             f"group, got {self.num_experts} experts in {self.n_group} groups")
        if self.top_k > per_group * self.topk_group:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) exceeds the {per_group * self.topk_group} experts "
                             f"in the topk_group ({self.topk_group}) groups a token can reach")

    @property
    def grouped(self) -> bool:
        return self.topk_method in ("group_limited_greedy", "noaux_tc")


class Router(torch.nn.Module):
    """``forward(x [T, H]) -> (expert ids int64 [T, top_k], weights float32 [T, top_k])``."""

    def __init__(self, hidden_size: int, config: RouterConfig, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.empty(config.num_experts, hidden_size, dtype=dtype))
        mark_sequence_parallel(self.weight)
        torch.nn.init.normal_(self.weight, std=0.02)
        self.e_score_correction_bias: Optional[torch.Tensor]
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Tokens routed to each expert on this rank since the last reset (real tokens only: the MoE routes
        # no SP padding). Named as Megatron's router names it, for its aux-free bias update.
        self.register_buffer("local_tokens_per_expert", torch.zeros(config.num_experts), persistent=False)

    @property
    def expert_bias(self) -> Optional[torch.Tensor]:
        """Megatron's name for ``e_score_correction_bias``."""
        return self.e_score_correction_bias

    def _apply(self, fn, recurse=True):
        # module.to(bf16) casts buffers too; the bias (its spread is a few bf16 ULPs in real checkpoints)
        # and the token counts keep float32 and only follow the device.
        kept = {name: self._buffers.pop(name) for name in _FLOAT32_BUFFERS if self._buffers.get(name) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == torch.float32 else buf.to(device=moved.device)
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        logits = F.linear(x.float(), self.weight.float())
        if cfg.topk_method == "noaux_tc":
            scores = batch_invariant.elementwise(torch.sigmoid, logits)
            choice = scores + self.e_score_correction_bias
            group_scores = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group).topk(2, dim=-1)[0].sum(-1)
            choice = _keep_best_groups(choice, group_scores, cfg, float("-inf"))
            ids = choice.topk(cfg.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, ids)
            if cfg.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1)
            if cfg.grouped:
                group_scores = scores.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group).max(dim=-1).values
                scores = _keep_best_groups(scores, group_scores, cfg, 0.0)
            weights, ids = scores.topk(cfg.top_k, dim=-1, sorted=False)
            if cfg.topk_method == "softmax" and cfg.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                self.local_tokens_per_expert += count_per_expert(ids, cfg.num_experts)
        return ids, weights * cfg.routed_scaling_factor


def _keep_best_groups(scores: torch.Tensor, group_scores: torch.Tensor, cfg: RouterConfig, fill: float):
    """``scores`` with every expert outside the ``topk_group`` best groups set to ``fill``."""
    best = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    keep = keep.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1)
    return scores.masked_fill(~keep, fill)


def count_per_expert(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``ids`` name each expert, int64 [num_experts]; unlike ``bincount`` it does not
    read the ids on the host (no device sync, CUDA-graph safe)."""
    ids = ids.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
