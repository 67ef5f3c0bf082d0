"""The paper's operators, forward and backward, against single-process math at t = 1, 2, 4."""
import pytest
import torch

from sp_core import mpu
from sp_core.mpu import platform
from support.multirank import RankFailed, run_ranks
from support.contexts import remake

HIDDEN = 3


def _data(seed, rank, rows, dtype):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(rows, HIDDEN, generator=g).to(dtype).to(platform.current_device())


def _check(got, want, dtype, what):
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype, what
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=what)


def _leaf(x):
    return x.clone().requires_grad_(True)


def _all_operators(dtype_name):
    dtype = getattr(torch, dtype_name)
    t, r = mpu.default_context().size, mpu.default_context().rank
    rows = 2 * t
    shard = slice(r * 2, (r + 1) * 2)

    # f: identity forward; backward sums the ranks' gradients.
    x = _leaf(_data(1, r, rows, dtype))
    up = [_data(2, k, rows, dtype) for k in range(t)]
    y = mpu.copy_to_tp(x)
    _check(y, x.detach(), dtype, "f forward")
    y.backward(up[r])
    _check(x.grad, sum(u.float() for u in up).to(dtype), dtype, "f backward")

    # f-bar: all-reduce forward; identity backward.
    xs = [_data(3, k, rows, dtype) for k in range(t)]
    x = _leaf(xs[r])
    y = mpu.reduce_from_tp(x)
    _check(y, sum(v.float() for v in xs).to(dtype), dtype, "f-bar forward")
    y.backward(up[r])
    _check(x.grad, up[r], dtype, "f-bar backward")

    # g: all-gather forward; reduce-scatter backward.
    full = _data(4, 0, rows, dtype)
    x = _leaf(full[shard])
    y = mpu.gather_from_sp(x)
    _check(y, full, dtype, "g forward")
    y.backward(up[r])
    _check(x.grad, sum(u.float() for u in up)[shard].to(dtype), dtype, "g backward")

    # g-bar: reduce-scatter forward; all-gather backward.
    x = _leaf(xs[r])
    y = mpu.reduce_scatter_to_sp(x)
    _check(y, sum(v.float() for v in xs)[shard].to(dtype), dtype, "g-bar forward")
    shard_grads = [_data(5, k, 2, dtype) for k in range(t)]
    y.backward(shard_grads[r])
    _check(x.grad, torch.cat(shard_grads), dtype, "g-bar backward")

    # scatter: split forward; all-gather backward.
    x = _leaf(full)
    y = mpu.scatter_to_sp(x)
    _check(y, full[shard], dtype, "scatter forward")
    y.backward(shard_grads[r])
    _check(x.grad, torch.cat(shard_grads), dtype, "scatter backward")

    # region edges with padding, T from 1 (ranks holding only padding) to non-multiples of t.
    for tokens in (1, 3, 5, 8):
        full = _data(6, tokens, tokens, dtype)
        x = _leaf(full)
        with mpu.default_context().sequence_parallel_for(True):
            inside = mpu.enter_sequence_parallel(x)
            per_rank = mpu.padded_length(tokens) // t
            assert inside.shape[0] == per_rank
            start = r * per_rank
            real = max(0, min(tokens - start, per_rank))
            _check(inside[:real], full[start:start + real], dtype, f"enter T={tokens}")
            assert torch.all(inside[real:] == 0), "padding rows must be zero"
            out = mpu.exit_sequence_parallel(inside * 2, tokens)
        _check(out, full * 2, dtype, f"exit T={tokens}")
        out.backward(torch.ones_like(out))
        _check(x.grad, torch.full_like(full, 2), dtype, f"edges backward T={tokens}")
    return _invariant_sums(dtype)


def _in_rank_order(xs):
    total = xs[0].float().clone()
    for x in xs[1:]:
        total += x.float()
    return total.to(xs[0].dtype)


def _invariant_sums(dtype):
    """Deterministic mode: f-bar, g-bar and g's backward sum in rank order whichever rank owns a row,
    bit for bit the single-process sum x0 + x1 + ... (so f-bar's rows equal g-bar's). Returns whether the
    default collectives differ from that order somewhere (the negative control)."""
    t, r = mpu.default_context().size, mpu.default_context().rank
    rows = 32 * t
    shard = slice(r * 32, (r + 1) * 32)
    xs = [_data(7, k, rows, dtype) * 10.0 ** (k % 3) for k in range(t)]  # magnitudes apart: rounding shows
    in_order = _in_rank_order(xs)
    default = mpu.reduce_from_tp(xs[r]), mpu.reduce_scatter_to_sp(xs[r])
    remake(deterministic=True)
    try:
        f_bar, g_bar = mpu.reduce_from_tp(xs[r]), mpu.reduce_scatter_to_sp(xs[r])
        x = _leaf(in_order[shard])
        mpu.gather_from_sp(x).backward(xs[r])
    finally:
        remake(deterministic=False)
    assert torch.equal(f_bar, in_order), "deterministic f-bar is not the rank-order sum"
    assert torch.equal(g_bar, in_order[shard]), "deterministic g-bar is not the rank-order sum"
    assert torch.equal(x.grad, in_order[shard]), "deterministic g backward is not the rank-order sum"
    return not (torch.equal(default[0], in_order) and torch.equal(default[1], in_order[shard]))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_operators_match_single_process_math(world, dtype_name):
    """Also the deterministic mode's sums; at t = 4 in float32 gloo's default sums are not all in rank
    order (the negative control: with 2 terms the order cannot matter, a + b == b + a exactly)."""
    default_differs = run_ranks(world, _all_operators, dtype_name)
    if world == 4 and dtype_name == "float32":
        assert any(default_differs), "gloo's default sums all came out in rank order: no negative control"
    if world < 3:
        assert not any(default_differs)


def _unpadded_reduce_scatter():
    mpu.reduce_scatter_to_sp(torch.ones(3, 2, device=platform.current_device()))


def test_undivisible_rows_name_the_problem():
    with pytest.raises(RankFailed, match="dim 0 has 3 rows, not a multiple of the tp size 2"):
        run_ranks(2, _unpadded_reduce_scatter)


def _tp_not_dividing_world():
    mpu.initialize(3)


def test_tp_that_does_not_divide_world():
    with pytest.raises(RankFailed, match="tensor-parallel size 3 does not divide the world size 2"):
        run_ranks(2, _tp_not_dividing_world)


def _rank_one_raises():
    if mpu.default_context().rank == 1:
        raise ValueError("rank one broke")
    mpu.reduce_from_tp(torch.ones(2, device=platform.current_device()))  # rank 0 waits in a collective that never completes


def test_raising_rank_ends_the_test_without_hang():
    with pytest.raises(RankFailed, match="rank one broke"):
        run_ranks(2, _rank_one_raises, timeout=60)


def test_operators_before_initialisation():
    mpu.destroy()
    with pytest.raises(mpu.ParallelStateError, match="not initialised"):
        mpu.reduce_from_tp(torch.ones(2))
