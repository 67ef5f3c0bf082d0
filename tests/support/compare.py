"""How tests compare tensors: the largest absolute difference over lists, and the relative one."""
from __future__ import annotations


def max_diff(a, b) -> float:
    """max |a_i - b_i| over two lists of tensors."""
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def rel(a, b) -> float:
    """max |a - b| / max |b| in float32, bf16 tensors too (b all zero: the absolute difference, over 1e-30)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
