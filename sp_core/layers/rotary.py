"""Rotary position embedding with the rope types of the Qwen and DeepSeek configs.

Two layouts of the rotated pairs: HF's rotate-half (dims i and i + d/2 form a pair; Qwen, DeepSeek-V3
with ``rope_interleave: false``) and interleaved (dims 2i and 2i + 1; DeepSeek's MLA). The interleaved
output keeps the interleaved layout, as DeepSeek-V2 and sglang do (transformers' V3 de-interleaves q and
k alike, which permutes both and leaves q.k unchanged).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from sp_core.kernels import lookup

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention factor applied to cos/sin)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)
    # "dynamic" (NTK) equals default within the original context length, which is all prefill sees
    # for positions below max_position_embeddings; longer contexts are rejected by the model config.
    return inv_freq, 1.0


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (as transformers' ``_compute_yarn_parameters``): frequencies blended between interpolated and
    extrapolated by a ramp over the dims; cos / sin scaled by mscale(f, mscale) / mscale(f, mscale_all_dim)
    (DeepSeek) or 0.1 ln f + 1. DeepSeek's softmax-scale factor lives in the model config, not here."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate

    def mscale(m=1.0):
        return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None, interleaved: bool = False):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(head_dim, theta, scaling)
        self.interleaved = interleaved
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: Optional[torch.nn.Module] = None, k_norm: Optional[torch.nn.Module] = None):
        """q [T, heads, d], k [T, kv_heads, d], positions [T] -> rotated q, k. With ``q_norm`` / ``k_norm``
        (Qwen3's per-head RMSNorms) those are applied first; in inference the platform's fused kernel
        (rotate-half layout), when there is one, does both in one pass."""
        fused = None if self.interleaved else lookup.fused_qk_norm_rope()
        norms = [n for n in (q_norm, k_norm) if n is not None]
        if fused is not None and not (torch.is_grad_enabled() and any(
                x.requires_grad for x in [q, k] + [n.weight for n in norms])):
            eps = norms[0].eps if norms else 0.0
            return fused(q, k, q_norm.weight if q_norm is not None else None,
                         k_norm.weight if k_norm is not None else None, eps, positions,
                         self.inv_freq.to(positions.device), self.attention_factor)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        return self._rotate_all(positions, q, k)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, d] at ``positions`` [T] -> rotated x."""
        return self._rotate_all(positions, x)[0]

    def _rotate_all(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple:
        """Each x [T, heads, d] at ``positions`` [T], rotated; one cos / sin table for all of them."""
        if not torch.is_grad_enabled():
            return _rotated_all(xs, positions, self.inv_freq.to(positions.device), self.attention_factor,
                                self.interleaved, lookup.rotary_in_float32())
        return _Rotate.apply(positions, self.inv_freq.to(positions.device), self.attention_factor, self.interleaved,
                             lookup.rotary_in_float32(), *xs)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float):
    """Per-pair cos and sin, [T, 1, d/2], scaled by the attention factor."""
    angles = (positions.float().unsqueeze(-1) * inv_freq).unsqueeze(1)
    if factor == 1.0:  # x * 1.0 is x, bit for bit: two ops fewer for every rope type but YaRN
        return angles.cos(), angles.sin()
    return angles.cos() * factor, angles.sin() * factor


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Each pair (a, b) -> (a cos - b sin, b cos + a sin). Rotating by -angle (sin -> -sin) is the
    transpose, which is the backward."""
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _rotated_all(xs, positions: torch.Tensor, inv_freq: torch.Tensor, factor: float, interleaved: bool, wide: bool,
                 sign: int = 1) -> tuple:
    """Each x of ``xs`` rotated by ``sign`` x its angles, from one cos / sin table (in float32 when ``wide``,
    else in x's dtype with cos / sin rounded to it, as HF's reference does)."""
    cos, sin = _cos_sin(positions, inv_freq, factor)
    if sign < 0:
        sin = -sin
    tables, out = {}, []
    for x in xs:
        dtype = torch.float32 if wide else x.dtype
        if dtype not in tables:
            tables[dtype] = cos.to(dtype), sin.to(dtype)
        out.append(_rotated(x.to(dtype), *tables[dtype], interleaved).to(x.dtype))
    return tuple(out)


class _Rotate(torch.autograd.Function):
    """Rotary embedding of several tensors (q and k) at the same positions, saving only the positions:
    the cos / sin tables cover all tokens (not a shard), so they are recomputed in backward rather than
    stored (DESIGN principle 6). ``wide``: compute in float32 (the pure-torch path)."""

    @staticmethod
    def forward(ctx, positions, inv_freq, factor, interleaved, wide, *xs):
        ctx.save_for_backward(positions, inv_freq)
        ctx.factor, ctx.interleaved, ctx.wide = factor, interleaved, wide
        return _rotated_all(xs, positions, inv_freq, factor, interleaved, wide)

    @staticmethod
    def backward(ctx, *grads):
        positions, inv_freq = ctx.saved_tensors
        return (None,) * 5 + _rotated_all(grads, positions, inv_freq, ctx.factor, ctx.interleaved, ctx.wide, sign=-1)
