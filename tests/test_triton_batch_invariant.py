"""The deterministic mode's one-launch GEMM (sp_core/kernels/triton_batch_invariant.py) on CPU, through
Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the switch is read when a kernel is defined).

Checked against torch.matmul (float32, float16, bfloat16) and for batch invariance: a row alone, inside
M = 37 at several offsets and inside M = 128 gives torch.equal results, with tiles small enough that the
rows fall in different tiles at different positions and K has a tail. Then the kernel wired into the
mode (the platform's choice patched to it, as on CUDA): a tiny Qwen3's prompt logprobs alone == inside a
mixed batch, and close to the blocked torch path.

A test stand-in, ``INTERPRETER_DOT``: the interpreter runs ``tl.dot`` as numpy's BLAS matmul of the
tile, and that is itself not batch-invariant (a row's result changes with its position in a 128-row
tile, measured with OpenBLAS 0.3.31), unlike a GPU MMA, which computes each output element from its own
row and column. The stand-in computes each element as that: a float32 sum over k in order. What is
tested is the kernel's own part: tiles chosen without M, no split-K, the K loop's order, the masks and
the rows past M. (It also reads bfloat16 tiles as numbers: Triton 3.8's interpreter multiplies their raw
uint16 bits.) The GPU check with the real MMA is benchmarks/batch_invariant_bench.py.
"""
import os
import subprocess
import sys

import pytest

INTERPRETER_DOT = r'''
import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def _float32(handle):
    if handle.dtype.scalar == tl.bfloat16:  # stored as the uint16 upper half of a float32
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data.astype(np.float32)


def _elementwise_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    products = _float32(a)[:, :, None] * _float32(b)[None, :, :]
    acc = np.zeros(products.shape[::2], dtype=np.float32)
    for k in range(products.shape[1]):  # each output element: its own row and column, k in order
        acc += products[:, k, :]
    return interpreter.TensorHandle(acc + d.data, d.dtype.scalar)


assert hasattr(interpreter.InterpreterBuilder, "create_dot"), "Triton's interpreter changed: update the stand-in"
interpreter.InterpreterBuilder.create_dot = _elementwise_dot
'''

KERNEL_CHECK = INTERPRETER_DOT + r'''
import torch
from sp_core.kernels import batch_invariant, triton_batch_invariant as tbi

small = tbi.Tiles(16, 16, 16, num_warps=4, num_stages=1)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 40, generator=g).to(dtype)  # K = 40: a tail after two 16-wide steps
    w = torch.randn(40, 40, generator=g).to(dtype)   # N = 40: a partial column tile
    full = tbi.matmul(x, w.t(), small)
    torch.testing.assert_close(full.float(), x.float() @ w.float().t(), atol=tol, rtol=tol)
    for row in (0, 21, 100):
        alone = tbi.matmul(x[row:row + 1], w.t(), small)[0]
        assert torch.equal(alone, full[row]), (dtype, row, "alone vs inside M = 128")
        for before in (0, 5, 20):  # the row at position `before` of an M = 37 window (tile 0 or 1)
            if before <= row and row - before + 37 <= 128:
                window = tbi.matmul(x[row - before:row - before + 37], w.t(), small)
                assert torch.equal(window[before], full[row]), (dtype, row, before, "inside M = 37")
    # a contiguous [K, N] right operand, the production tile (K tail against BLOCK_K), M = 0
    b = w.t().contiguous()
    torch.testing.assert_close(tbi.matmul(x[:37], b).float(), x[:37].float() @ b.float(), atol=tol, rtol=tol)
    assert tbi.matmul(x[:0], b).shape == (0, 40)

# autograd through the wrapper: the input gradient through the kernel as well
x = torch.randn(9, 24, requires_grad=True)
w = torch.randn(16, 24, requires_grad=True)
y = batch_invariant._KernelMatmul.apply(x, w.t(), tbi.matmul)
grad = torch.randn(9, 16)
y.backward(grad)
torch.testing.assert_close(y, x @ w.t(), atol=1e-5, rtol=1e-5)
torch.testing.assert_close(x.grad, grad @ w, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(w.grad, grad.t() @ x, atol=1e-5, rtol=1e-5)
for bad in ((x, w), (x.double(), w.t().double())):
    try:
        tbi.matmul(*bad)
    except ValueError as e:
        assert "batch-invariant matmul takes" in str(e)
    else:
        raise AssertionError("bad input accepted")
print("kernel ok")
'''

MODE_CHECK = INTERPRETER_DOT + r'''
import sys
import torch
from sp_core import mpu
from support.contexts import single_process
from sp_core.kernels import lookup, triton_batch_invariant as tbi
from sp_core.app.runtime import load_model, prompt_logprobs
from sp_core.app.tiny import make_checkpoint

model_dir = make_checkpoint("qwen3", sys.argv[1])
prompts = [[int(t) for t in torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (5, 1, 30, 3, 17)]
with single_process():
    model = load_model(model_dir, parallel=mpu.single_rank(deterministic=True))
    blocked = prompt_logprobs(model, prompts)
    launches = []
    lookup.batch_invariant_matmul = lambda device: lambda a, b: launches.append(a.shape) or tbi.matmul(a, b)
    together = prompt_logprobs(model, prompts)
    assert launches and len({shape[0] for shape in launches}) == 1, launches  # every GEMM, all 56 rows
    for i in (0, 1, 4):
        alone = prompt_logprobs(model, [prompts[i]])[0]
        assert torch.equal(alone, together[i]), i
    for a, b in zip(together, blocked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
print("mode ok", len(launches))
'''


def _interpret(script, *args):
    pytest.importorskip("triton")
    # the script imports tests/support (conftest puts tests/ on this process's path, not on the child's)
    path = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_kernel_equals_matmul_and_rows_do_not_depend_on_the_batch():
    assert "kernel ok" in _interpret(KERNEL_CHECK)


def test_deterministic_mode_with_the_kernel(tmp_path):
    assert "mode ok" in _interpret(MODE_CHECK, str(tmp_path / "qwen3"))


def _compile_for_h100(dtype, tiles, even_k: bool, a_aligned: bool) -> str:
    """PTX of the kernel for sm_90, specialised as Triton's launcher would for a [M, K] @ W^T (unit
    strides along K; M left unspecialised); ``a_aligned``: a's rows 16-byte aligned (not so for a row
    alone at an odd offset when K * itemsize is not a multiple of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import torch
    from sp_core.kernels import triton_batch_invariant as tbi

    names = tbi._matmul_kernel.arg_names
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    constants = dict(stride_ak=1, stride_bk=1, stride_cn=1, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                     BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m, EVEN_K=even_k,
                     PRECISION="ieee" if dtype == torch.float32 else None)
    signature = {name: "constexpr" if name in constants else f"*{short}" if name.endswith("_ptr") else "i32"
                 for name in names}
    aligned = ("b_ptr", "c_ptr", "N", "K", "stride_bn", "stride_cm") + (("a_ptr", "stride_am") if a_aligned else ())
    source = ASTSource(tbi._matmul_kernel, signature, {(names.index(c),): v for c, v in constants.items()},
                       {(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    assert kernel.metadata.shared <= 227 * 1024, (dtype, tiles, kernel.metadata.shared)  # H100's limit
    return kernel.asm["ptx"]


def test_kernel_compiles_for_h100_with_tensor_cores():
    """Compiled for sm_90 here (Triton's own ptxas, no GPU): bf16 / fp16 tiles use wgmma and fit H100's
    227 KiB of shared memory, with the same MMA instruction whether a's rows are aligned or not (a row
    alone at any offset runs the same arithmetic); float32 stays off TF32 (FMA, no MMA)."""
    pytest.importorskip("triton")
    import re

    import torch
    from sp_core.kernels import triton_batch_invariant as tbi

    kernel = tbi._matmul_kernel
    assert kernel.do_not_specialize == ["M"] or kernel.arg_names.index("M") in kernel.do_not_specialize
    for dtype, n, k in ((torch.bfloat16, 1536, 4096), (torch.bfloat16, 512, 4000), (torch.float16, 4096, 3072),
                        (torch.float32, 1536, 4096)):
        tiles = tbi.tiles_for(dtype, n, k)
        ptx = _compile_for_h100(dtype, tiles, k % tiles.block_k == 0, a_aligned=True)
        if dtype == torch.float32:
            assert "wgmma" not in ptx and "tf32" not in ptx and "fma.rn.f32" in ptx, tiles
            continue
        mma = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
        instructions = set(re.findall(r"wgmma\.mma_async\S*|mma\.sync\S*", ptx))
        assert instructions == {f"wgmma.mma_async.sync.aligned.m64n{tiles.block_n}k16.f32.{mma}.{mma}"}, instructions
        if dtype == torch.bfloat16 and n == 1536:
            unaligned = _compile_for_h100(dtype, tiles, True, a_aligned=False)
            assert set(re.findall(r"wgmma\.mma_async\S*|mma\.sync\S*", unaligned)) == instructions
