"""A batch-invariant GEMM in Triton: row i of ``a @ b`` comes out bit-identical whatever the number of
rows M and wherever the row sits, in one launch (the deterministic mode's activation GEMMs on CUDA).

Why a library GEMM is not batch-invariant: cuBLAS picks its kernel, tile and split-K by the shape. With
split-K the K-sum of one output is cut into partial sums added at the end, and how many pieces there
are depends on M; a different kernel or tile (a different BLOCK_K, or MMA instructions of another
depth) adds the same products in another order. Floating-point addition is not associative, so the last
bits of a row change with the batch around it.

Why this kernel is: every output element (i, j) is computed by the one program that owns its tile, as
``acc = 0; for k-block in 0, 1, ..., K / BLOCK_K: acc += a[i, k-block] . b[k-block, j]`` in float32,
then rounded once to the output dtype. The tile sizes (``Tiles``) are chosen from the dtype, N and K,
never from M; there is no split-K; the K loop always runs in the same order; and an MMA computes each
output element from its own row and column only, so the other rows of the tile (other tokens, or the
padding past M, which re-reads valid rows) do not enter row i's sum. Only which tile holds row i changes
with M or with the row's offset, and every tile runs the same instructions. M is not specialised on
(``do_not_specialize``), so M = 1 compiles the same kernel as M = 8192.

``tl.dot`` accumulates in float32; float32 inputs use ``input_precision="ieee"`` (FMA, inputs not
rounded to TF32). No autograd here: ``sp_core.kernels.batch_invariant`` wraps it and chooses it on CUDA;
CPU (and CUDA without Triton) keeps the blocked torch path. Tested on CPU through Triton's interpreter
(TRITON_INTERPRET=1) and by compiling for sm_90 (tests/test_triton_batch_invariant.py); on GPUs by
benchmarks/batch_invariant_bench.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # tiles of GROUP_M row blocks run side by side, so b's columns stay in L2


def tiles_for(dtype: torch.dtype, n: int, k: int) -> Tiles:
    """The tile for a GEMM of this dtype and shape. Depends on N and K only (never on M): changing it
    changes every row's summation order."""
    if dtype == torch.float32:
        return Tiles(128, 128, 32, num_warps=8, num_stages=3)
    if n >= 1024:  # H100 / H200 bf16: 128 x 256 x 64 with 8 warps and 3 stages, 144 KiB of shared memory
        return Tiles(128, 256, 64, num_warps=8, num_stages=3)
    return Tiles(128, 128, 64, num_warps=8, num_stages=4)


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # rows past M and columns past N re-read valid ones (no masks on the hot loads); never stored
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_tile = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):  # always from k = 0 up, one program per output tile
        if EVEN_K:
            a = tl.load(a_tile)
            b = tl.load(b_tile)
        else:
            left = K - step * BLOCK_K
            a = tl.load(a_tile, mask=ks[None, :] < left, other=0.0)
            b = tl.load(b_tile, mask=ks[:, None] < left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk

    out_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = c_ptr + out_rows[:, None] * stride_cm + out_cols[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))


SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)


def matmul(a: torch.Tensor, b: torch.Tensor, tiles: Optional[Tiles] = None) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` [M, K] and ``b`` [K, N] of one dtype among ``SUPPORTED``, batch-invariant
    over M. ``tiles``: a tile other than ``tiles_for``'s (the interpreter tests use small ones)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"batch-invariant matmul takes [M, K] @ [K, N]; got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in SUPPORTED:
        raise ValueError(f"batch-invariant matmul takes two tensors of one dtype among {SUPPORTED}; "
                         f"got {a.dtype} and {b.dtype}")
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    tiles = tiles or tiles_for(a.dtype, n, k)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    _matmul_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         c.stride(0), c.stride(1), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                         BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m, EVEN_K=k % tiles.block_k == 0,
                         PRECISION="ieee" if a.dtype == torch.float32 else None,
                         num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return c
