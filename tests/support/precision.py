"""bfloat16 runs against a float32 reference: relative error and greedy tokens."""
from __future__ import annotations

import torch

BF16_REL = 1e-2  # relative norm error of bf16 log-probabilities against the float32 reference
CLEAR_MARGIN = 0.1  # float32 top-1 over top-2 (log-probability) above which bf16 must pick the same token


def assert_bf16_matches_float32(got, ref, what: str, min_decided: int = 8, rel_bound: float = BF16_REL) -> float:
    """Per prompt: ||got - ref|| / ||ref|| <= rel_bound (BF16_REL unless stated), and equal greedy tokens wherever float32's top-1 leads
    its top-2 by more than CLEAR_MARGIN (a random tiny model has near-ties that bf16 rounding may flip).
    Returns the largest relative error."""
    worst, decided = 0.0, 0
    for g, r in zip(got, ref):
        rel = ((g.float() - r).norm() / r.norm()).item()
        worst = max(worst, rel)
        assert rel <= rel_bound, f"{what}: bf16 relative error {rel:.3e} > {rel_bound}"
        top2 = r.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > CLEAR_MARGIN
        decided += int(clear.sum())
        assert torch.equal(g.argmax(-1)[clear], r.argmax(-1)[clear]), f"{what}: greedy tokens differ in bf16"
    assert decided >= min_decided, f"{what}: too few clearly decided positions ({decided}) for the greedy check"
    return worst
