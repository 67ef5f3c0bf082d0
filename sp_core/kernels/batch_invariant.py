"""Batch-invariant GEMMs for the deterministic mode: a row's result does not depend on how many other
rows are in the call.

torch's CPU matmul is not batch-invariant (measured on the 2-core CPU machine, torch 2.13, float32,
K = 64 .. 4096): with M rows, the rows past the last multiple of 4 come out differently for M < 12
(M = 1 takes a GEMV path; M = 2, 3 and the tails of 5-7 and 9-11 rows another kernel), up to 2e-4
apart at K = 4096. GPU libraries pick tiles and split-K by the shape too. So in the deterministic mode
every GEMM on activations goes through ``mm``: on CUDA with Triton, one launch of a kernel with fixed
tiles and no split-K (``sp_core.kernels.triton_batch_invariant``, whose docstring says why that is
batch-invariant); elsewhere (CPU, Ascend, CUDA without Triton or with SP_CORE_FUSED=0) its rows are
computed in blocks of a fixed number of rows, the last one padded with zeros: every call has the same
shape, and each row's sum runs in the same order whatever the batch (16-row blocks on CPU, measured
invariant for M = 1 .. 80; 128 on accelerators).

Elementwise ops are not all batch-invariant on CPU either: ATen runs a contiguous tensor through its
vector kernel in chunks and the last few elements through the scalar one, and for ``sigmoid`` the two
differ in the last bit (measured: AVX2, torch 2.13; exp, cos, sin, tanh, log, sqrt, rsqrt agreed). So a
token's router score depended on how many tokens the batch held. ``elementwise(fn, x)`` runs such an op on
fixed blocks of rows (used by the MoE router; the SwiGLU activations act on strided halves of gate_up,
which ATen loops over row by row, and need nothing).

``gemms()`` is entered by the model's forward (``CausalLM``) and by an adapter around framework code
that computes on the model's activations (sglang's logits processor); it intercepts ``F.linear``,
``matmul`` / ``@`` with a 2-D right operand, ``mm``, ``addmm`` and the MoE experts' ``_grouped_mm``
(torch's CPU grouped GEMM is not batch-invariant either: a row's result changes with the number of rows
in its group, that is with which other tokens picked the same expert; each group goes through ``mm``
instead). In backward, the input gradient of an intercepted GEMM is computed the same way (row by row);
the weight gradient is a plain torch GEMM (it sums over the batch by definition).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sp_core.kernels import lookup

CPU_BLOCK_ROWS = 16
ACCELERATOR_BLOCK_ROWS = 128


def block_rows(device: torch.device) -> int:
    return CPU_BLOCK_ROWS if device.type == "cpu" else ACCELERATOR_BLOCK_ROWS


def blocked_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` [M, K] and ``b`` [K, N], in fixed blocks of rows (the last zero-padded)."""
    rows, size = a.shape[0], block_rows(a.device)
    if rows == 0:
        return torch.mm(a, b)
    padding = -rows % size
    if padding:
        a = torch.cat([a, a.new_zeros(padding, a.shape[1])])
    return torch.cat([torch.mm(block, b) for block in a.split(size)])[:rows]


class _KernelMatmul(torch.autograd.Function):
    """``a @ b`` through ``lookup.batch_invariant_matmul``; backward: the input gradient through it
    too, the weight gradient with torch."""

    @staticmethod
    def forward(ctx, a, b, kernel):
        ctx.kernel = kernel
        ctx.save_for_backward(a, b)
        return kernel(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = ctx.kernel(grad, b.t()) if ctx.needs_input_grad[0] else None
        grad_b = a.t().mm(grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batch-invariant ``a @ b`` for 2-D ``a`` [M, K] and ``b`` [K, N]: the one-launch kernel where the
    platform has one, else ``blocked_mm``."""
    kernel = lookup.batch_invariant_matmul(a.device)
    if kernel is not None:
        if torch.is_autocast_enabled(a.device.type):  # what torch.mm would compute in
            dtype = torch.get_autocast_dtype(a.device.type)
            a, b = a.to(dtype), b.to(dtype)
        if a.dtype == b.dtype and a.dtype in _KERNEL_DTYPES and a.device == b.device:
            return _KernelMatmul.apply(a, b, kernel)
    return blocked_mm(a, b)


def elementwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn`` over the rows of a 2-D ``x``; inside ``gemms()`` on CPU, in fixed
    blocks of rows (the last zero-padded), so that each element takes the same kernel path whatever the
    number of rows."""
    rows, size = x.shape[0], CPU_BLOCK_ROWS
    if not _active or x.device.type != "cpu" or rows == 0:
        return fn(x)
    padded = F.pad(x, (0, 0, 0, -rows % size))
    return torch.cat([fn(block) for block in padded.split(size)])[:rows]


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """DeepSeek-V3.2's index scores ``[rows, n]`` = sum_h weights[:, h] * relu(scale * q[:, h] . keys^T), every
    element computed the same way whatever the number of query rows and keys (torch's einsum is not: measured,
    its q.k products and its sum over heads change in the last bit with the shapes): the q.k products through
    ``mm`` on fixed blocks of keys (the last zero-padded; a key's column within its block measured not to
    matter), the sum over heads one head at a time in exactly rounded multiplies and adds.
    ``q`` [rows, heads, d], ``weights`` [rows, heads], ``keys`` [n, d]."""
    rows, heads, d = q.shape
    n, size = keys.shape[0], block_rows(keys.device)
    flat = q.reshape(rows * heads, d)
    blocks = F.pad(keys, (0, 0, 0, -n % size)).split(size)
    logits = torch.cat([mm(flat, block.t()) for block in blocks], dim=1)[:, :n] if n else flat.new_zeros(rows * heads, 0)
    logits = F.relu(logits.view(rows, heads, n) * scale)
    out = logits[:, 0] * weights[:, :1]
    for h in range(1, heads):
        out = out + logits[:, h] * weights[:, h:h + 1]
    return out


def _matmul_2d_right(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = mm(a.reshape(-1, a.shape[-1]), b)
    return out.view(*a.shape[:-1], b.shape[-1])


def _linear(x, weight, bias=None):
    out = _matmul_2d_right(x, weight.t())
    return out + bias if bias is not None else out


def _addmm(bias, a, b, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        return None
    return mm(a, b) + bias


def _grouped_mm(x, weight, offs):
    """``torch._grouped_mm(x [N, K], weight [G, K, out], offs)`` group by group through ``mm`` (``offs``,
    the groups' cumulative ends, is read on the host)."""
    ends = offs.tolist()
    pieces = [mm(x[start:end], weight[g]) for g, (start, end) in enumerate(zip([0] + ends[:-1], ends)) if end > start]
    # no rows (an EP rank that received no tokens): still a product of x and weight, or the backward
    # would skip this rank's part of the graph -- and the all-to-all in it that the other ranks wait in
    return torch.cat(pieces) if pieces else x[:0] @ weight[0]


def _is_gemm(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() == 2
            and a.is_floating_point())


class BatchInvariantGemms(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _is_gemm(args[0], args[1]):
            return _linear(*args, **kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and not kwargs \
                and _is_gemm(args[0], args[1]):
            return _matmul_2d_right(args[0], args[1])
        if func in (torch.mm, torch.Tensor.mm) and not kwargs and _is_gemm(args[0], args[1]):
            return mm(args[0], args[1])
        if func in (torch.addmm, torch.Tensor.addmm) and len(args) == 3 and _is_gemm(args[1], args[2]) \
                and args[1].dim() == 2 and set(kwargs) <= {"beta", "alpha"}:
            out = _addmm(*args, **kwargs)
            if out is not None:
                return out
        if func is torch._grouped_mm and len(args) == 2 and set(kwargs) == {"offs"} and args[0].dim() == 2 \
                and args[1].dim() == 3 and args[0].is_floating_point():
            return _grouped_mm(*args, **kwargs)
        return func(*args, **kwargs)


_active = False


@contextlib.contextmanager
def gemms(active: bool) -> Iterator[None]:
    """Batch-invariant GEMMs for this block when ``active`` (a context's deterministic flag); nothing otherwise."""
    global _active
    if _active or not active:
        yield
        return
    _active = True
    try:
        with BatchInvariantGemms():
            yield
    finally:
        _active = False


def when_deterministic(method: Callable) -> Callable:
    """Run a module's ``method`` inside ``gemms(self.parallel.deterministic)``."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with gemms(self.parallel.deterministic):
            return method(self, *args, **kwargs)
    return wrapper
