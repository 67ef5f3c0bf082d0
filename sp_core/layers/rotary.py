"""Rotary position embedding (HF's rotate-half layout) with the rope types the Qwen configs use."""
from __future__ import annotations

import math
from typing import Optional

import torch

from sp_core.mpu import platform

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
        factor = scaling["factor"]
        original = scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def correction_dim(rotations):
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
        attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv_freq, attention_factor
    # "dynamic" (NTK) equals default within the original context length, which is all prefill sees
    # for positions below max_position_embeddings; longer contexts are rejected by the model config.
    return inv_freq, 1.0


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: Optional[torch.nn.Module] = None, k_norm: Optional[torch.nn.Module] = None):
        """q [T, heads, d], k [T, kv_heads, d], positions [T] -> rotated q, k. With ``q_norm`` / ``k_norm``
        (Qwen3's per-head RMSNorms) those are applied first; in inference the platform's fused kernel,
        when there is one, does both in one pass."""
        inv_freq = self.inv_freq.to(positions.device)
        fused = platform.fused_qk_norm_rope()
        norms = [n for n in (q_norm, k_norm) if n is not None]
        if fused is not None and not (torch.is_grad_enabled() and any(
                x.requires_grad for x in [q, k] + [n.weight for n in norms])):
            eps = norms[0].eps if norms else 0.0
            return fused(q, k, q_norm.weight if q_norm is not None else None,
                         k_norm.weight if k_norm is not None else None, eps, positions, inv_freq,
                         self.attention_factor)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        wide = platform.rotary_in_float32()
        return (_Rotate.apply(q, positions, inv_freq, self.attention_factor, wide),
                _Rotate.apply(k, positions, inv_freq, self.attention_factor, wide))


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float):
    freqs = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return angles.cos() * factor, angles.sin() * factor


def _rotate_half(x: torch.Tensor, sign: int = 1) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-sign * x[..., half:], sign * x[..., :half]], dim=-1)


class _Rotate(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, saving only the positions: the cos / sin tables cover all tokens
    (not a shard), so they are recomputed in backward rather than stored (DESIGN principle 6).
    ``wide``: compute in float32 (the pure-torch path); else in x's dtype with cos / sin rounded to it,
    as HF's reference does."""

    @staticmethod
    def forward(ctx, x, positions, inv_freq, factor, wide):
        ctx.save_for_backward(positions, inv_freq)
        ctx.factor, ctx.wide = factor, wide
        dtype = torch.float32 if wide else x.dtype
        cos, sin = (c.to(dtype) for c in _cos_sin(positions, inv_freq, factor))
        xw = x.to(dtype)
        return (xw * cos + _rotate_half(xw) * sin).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        positions, inv_freq = ctx.saved_tensors
        dtype = torch.float32 if ctx.wide else grad.dtype
        cos, sin = (c.to(dtype) for c in _cos_sin(positions, inv_freq, ctx.factor))
        g = grad.to(dtype)
        # the transpose of rotate_half is rotate_half with the opposite sign
        return (g * cos + _rotate_half(g * sin, sign=-1)).to(grad.dtype), None, None, None, None
