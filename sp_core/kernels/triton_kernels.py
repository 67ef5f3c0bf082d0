"""Triton kernels for the inference path on GPUs: residual add + RMSNorm, and Qwen3's per-head q/k
RMSNorm + rotary, each one pass over memory. Chosen by ``sp_core.kernels.lookup``; no autograd (training
uses torch's fused ``rms_norm`` and rotary ops). Both keep float32 accumulation and round once.
Tested against the pure-torch path on CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, stride_x, stride_r, stride_y, stride_s,
                         n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(s_ptr.dtype.element_ty)  # rounded to the input dtype, as ``hidden + residual`` is
    tl.store(s_ptr + row * stride_s + cols, s, mask=mask)
    wide = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(wide * wide, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (wide * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual) * weight, x + residual) for 2-D [rows, hidden] inputs."""
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    y, s = torch.empty_like(x2), torch.empty_like(x2)
    rows, n = x2.shape
    if rows:
        _add_rms_norm_kernel[(rows,)](x2, r2, weight, y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
                                      n, eps, BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 4096 else 4)
    return y.view_as(x), s.view_as(x)


@triton.jit
def _norm_rope_kernel(x_ptr, o_ptr, w_ptr, pos_ptr, inv_ptr, stride_xt, stride_xh, stride_ot, stride_oh,
                      heads, half, eps, factor, NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < half)
    src = x_ptr + token * stride_xt + h * stride_xh + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)
        dmask = d < half
        x1 = x1 * rstd[:, None] * tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        x2 = x2 * rstd[:, None] * tl.load(w_ptr + half + d, mask=dmask, other=0.0).to(tl.float32)
    angle = tl.load(pos_ptr + token).to(tl.float32) * tl.load(inv_ptr + d, mask=d < half, other=0.0)
    cos, sin = tl.cos(angle) * factor, tl.sin(angle) * factor
    dst = o_ptr + token * stride_ot + h * stride_oh + d
    tl.store(dst, (x1 * cos - x2 * sin).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(o_ptr.dtype.element_ty), mask=mask)


def _norm_rope(x, weight, eps, positions, inv_freq, factor):
    tokens, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        half = dim // 2
        _norm_rope_kernel[(tokens,)](
            x, out, weight if weight is not None else x, positions, inv_freq,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), heads, half, eps, float(factor),
            NORM=weight is not None, BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(half),
            num_warps=4)
    return out


def qk_norm_rope(q, k, q_weight, k_weight, eps, positions, inv_freq, factor):
    """q [T, heads, d], k [T, kv_heads, d] (strided views of the qkv output are fine) -> new contiguous
    q, k: optional per-head RMSNorm with the given weights, then rotate-half rotary at ``positions``."""
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    positions = positions.contiguous()
    return (_norm_rope(q, q_weight, eps, positions, inv_freq, factor),
            _norm_rope(k, k_weight, eps, positions, inv_freq, factor))
