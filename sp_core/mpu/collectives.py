"""Collectives on dim 0 over the TP group. The only module that calls torch.distributed's data ops.

When an adapter bound a framework communicator (``parallel_state.bind(..., communicator=...)``, e.g.
sglang's GroupCoordinator), the sum all-reduce, all-gather and reduce-scatter go through it instead, so
the framework's custom all-reduce and CUDA-graph-safe paths apply; the rest (max all-reduce, async
starts for backward overlap, broadcast) stays on torch.distributed, which serving does not use.

In the deterministic mode (``parallel_state.set_deterministic``) every sum over TP -- the all-reduce of
f-bar and f's backward, the reduce-scatter of g-bar and g's backward -- takes each element's sum in rank
order, whichever rank owns it, so that a row's value does not depend on how the batch was split:

    collective                  who sums row i (owned by rank d)         order of the t terms
    ring reduce-scatter         passed d+1 -> d+2 -> ... -> d            x[d+1] + ... + x[t-1] + x[0] + ... + x[d]
    ring all-reduce             its reduce-scatter phase, as above       as above, d = the chunk's owner
    tree / halving-doubling     the algorithm's pairing of ranks         depends on size, algorithm, channels
    invariant reduce-scatter    all-to-all of the partial chunks, then   x[0] + x[1] + ... + x[t-1]
                                rank d sums what it received locally     (always)
    invariant all-reduce        invariant reduce-scatter + all-gather    x[0] + x[1] + ... + x[t-1]

A ring's sum starts after the owner, so the same row gets a different rotation of the terms -- and a
different rounding -- when a different rank owns it: SP on vs off (all-reduce vs reduce-scatter), or a
batch whose size moves the row to another token shard (vLLM #56377). With t = 2 the two terms commute
exactly; from t = 3 they do not. The invariant pair moves the same bytes as a ring reduce-scatter
((t-1)/t of the tensor per rank), plus an all-gather for the all-reduce, as a ring all-reduce does.

Every call is counted (``counts()``), and appended to the file named by SP_CORE_COLLECTIVE_LOG when
set, as ``<pid> <op> <shape> <route>`` (route: the communicator's class name, or ``torch``), so tests
can prove which collectives a forward issued and through what, also inside worker processes.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
from typing import Dict, Iterator, List, Sequence

import torch
import torch.distributed as dist

from sp_core.mpu import activity, async_tp, copy_engine
from sp_core.mpu import parallel_state as ps

_COUNTS: Dict[str, int] = collections.Counter()
# torch >= 2.12 renamed the tensor collectives; the GPU image's torch 2.11 has only the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _start(op: str, tensor, communicator=None) -> None:
    """Count the collective and mark this rank as waiting in it (``activity``: the hang detector). Only
    ``_issued`` and ``Pending`` call it, and both leave in a ``finally``: a rank never stays "waiting"
    after a collective returned or raised (the hang detector would kill a run that is still working)."""
    if tensor is not None:
        _COUNTS[op] += 1
        path = os.environ.get("SP_CORE_COLLECTIVE_LOG")
        if path:
            route = type(communicator).__name__ if communicator is not None else "torch"
            shape = str(tuple(tensor.shape)).replace(" ", "")
            with open(path, "a") as log:
                log.write(f"{os.getpid()} {op} {shape} {route}\n")
    activity.enter_collective(op, None if tensor is None else tensor.shape)


@contextlib.contextmanager
def _issued(op: str, tensor=None, communicator=None) -> Iterator[None]:
    """The one door of every blocking collective: counted (unless ``tensor`` is None), on the activity
    board while inside, left in a ``finally``."""
    _start(op, tensor, communicator)
    try:
        yield
    finally:
        activity.leave_collective()


def counts() -> Dict[str, int]:
    return dict(_COUNTS)


@contextlib.contextmanager
def counting() -> Iterator[Dict[str, int]]:
    """Yields a dict that, after the block, holds the collectives issued inside it."""
    before = collections.Counter(_COUNTS)
    result: Dict[str, int] = {}
    try:
        yield result
    finally:
        after = collections.Counter(_COUNTS)
        after.subtract(before)
        result.update({k: v for k, v in after.items() if v})


def _gloo() -> bool:
    return ps.tp_backend() == "gloo"


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce(x: torch.Tensor, op: str = "sum", in_place: bool = False) -> torch.Tensor:
    """Sum (or max) over TP, in a new tensor; with ``in_place``, into a contiguous ``x`` itself where the
    route allows (for a partial result that the caller owns and drops: no copy). Use the returned tensor."""
    if ps.tp_size() == 1:
        return x
    if op == "sum" and ps.deterministic():
        return invariant_all_reduce(x)
    communicator = ps.communicator() if op == "sum" else None
    # the communicator may reduce in place: the caller's x stays intact unless it gave it away
    out = x if in_place and x.is_contiguous() else x.contiguous().clone()
    with _issued("all_reduce", x, communicator):
        if communicator is not None:
            return communicator.all_reduce(out)
        if _gloo() and out.dtype == torch.bfloat16:  # gloo reduces bf16 too coarsely: go via fp32
            wide = out.float()
            dist.all_reduce(wide, op=_REDUCE_OPS[op], group=ps.tp_group())
            return wide.to(out.dtype)
        dist.all_reduce(out, op=_REDUCE_OPS[op], group=ps.tp_group())
        return out


def _check_divisible(x: torch.Tensor, what: str) -> None:
    t = ps.tp_size()
    if x.shape[0] % t != 0:
        raise ValueError(
            f"{what}: dim 0 has {x.shape[0]} rows, not a multiple of the tp size {t}; "
            f"pad with sp_core.mpu.enter_sequence_parallel (or pad_to_multiple) first"
        )


def _rows_times(x: torch.Tensor, t: int) -> torch.Tensor:
    """An empty output of ``t`` times x's rows (an all-gather's)."""
    return x.new_empty((x.shape[0] * t,) + tuple(x.shape[1:]))


def _rows_over(x: torch.Tensor, t: int) -> torch.Tensor:
    """An empty output of 1/t of x's rows (a reduce-scatter's)."""
    return x.new_empty((x.shape[0] // t,) + tuple(x.shape[1:]))


class Pending:
    """A collective in flight (``async_op``): ``wait()`` returns its result. Lets a caller overlap the
    communication with independent compute, e.g. a GEMM. Started through ``_start``; the wait leaves."""

    def __init__(self, out: torch.Tensor, work=None, dtype: torch.dtype | None = None):
        self._out, self._work, self._dtype = out, work, dtype

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            work, self._work = self._work, None
            try:
                work.wait()
            finally:
                activity.leave_collective()
        return self._out if self._dtype is None else self._out.to(self._dtype)


def _in_flight(op: str, x: torch.Tensor, launch) -> Pending:
    """A ``Pending`` of ``launch()`` (which returns its arguments), entered on the board before the launch
    and left by its wait -- or now, if the launch itself raises."""
    _start(op, x)
    try:
        return launch()
    except BaseException:
        activity.leave_collective()
        raise


def all_gather_start(x: torch.Tensor) -> Pending:
    """Start concatenating every rank's ``x`` along dim 0 (rank order)."""
    t = ps.tp_size()
    if t == 1:
        return Pending(x)
    x = x.contiguous()
    out = _rows_times(x, t)
    return _in_flight("all_gather", x,
                      lambda: Pending(out, _all_gather_tensor(out, x, group=ps.tp_group(), async_op=True)))


def _all_gather_through(communicator, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = _rows_times(x, ps.tp_size())
    with _issued("all_gather", x, communicator):
        communicator.all_gather_into_tensor(out, x)
    return out


def _reduce_scatter_through(communicator, x: torch.Tensor) -> torch.Tensor:
    _check_divisible(x, "reduce_scatter")
    x = x.contiguous()
    out = _rows_over(x, ps.tp_size())
    with _issued("reduce_scatter", x, communicator):
        communicator.reduce_scatter_tensor(out, x)
    return out


def reduce_scatter_start(x: torch.Tensor) -> Pending:
    """Start summing over TP, keeping this rank's contiguous 1/t of dim 0."""
    t = ps.tp_size()
    if t == 1:
        return Pending(x)
    if ps.deterministic():
        return Pending(invariant_reduce_scatter(x))
    _check_divisible(x, "reduce_scatter")
    x = x.contiguous()
    return _in_flight("reduce_scatter", x, lambda: Pending(*_reduce_scatter_in_flight(x)))


def _reduce_scatter_in_flight(x: torch.Tensor):
    """(out, work, dtype to return) of an async reduce-scatter of a contiguous ``x``, not counted."""
    wide = x.float() if _gloo() and x.dtype == torch.bfloat16 else x  # gloo sums bf16 too coarsely
    out = _rows_over(wide, ps.tp_size())
    work = _reduce_scatter_tensor(out, wide, group=ps.tp_group(), async_op=True)
    return out, work, x.dtype if wide.dtype != x.dtype else None


class _HalvesPending(Pending):
    """Two reduce-scatters in flight, each over half of the output columns: ``wait()`` joins them."""

    def __init__(self, halves: list):
        self._halves, self._joined = halves, None

    def wait(self) -> torch.Tensor:
        if self._joined is None:
            halves, self._halves = self._halves, None
            try:
                for _, work, _ in halves:
                    work.wait()
            finally:
                activity.leave_collective()
            self._joined = torch.cat([out if dtype is None else out.to(dtype) for out, _, dtype in halves], -1)
        return self._joined


def _as_autocast_would(a: torch.Tensor, b: torch.Tensor):
    """The GEMM operands autocast would hand ``a @ b``: the fused forms multiply with ``out=`` (or in
    torch's fused ops), which autocast does not see -- fp32 weights under bf16 autocast would not match."""
    kind = a.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        return a.to(dtype), b.to(dtype)
    return a, b


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order)."""
    t = ps.tp_size()
    if t == 1:
        return x
    if ps.communicator() is not None:
        return _all_gather_through(ps.communicator(), x)
    x = x.contiguous()
    out = _rows_times(x, t)
    with _issued("all_gather", x):  # not async_op + wait(): NCCL's work object and stream event cost
        _all_gather_tensor(out, x, group=ps.tp_group())  # ~30 us a call (4 x H200)
    return out


def gather_to_first(x: torch.Tensor):
    """Every rank's ``x`` concatenated along dim 0 on TP rank 0 only (None on the others, which only
    send): for an export that one rank writes, so no other rank holds the full tensor."""
    t = ps.tp_size()
    if t == 1:
        return x
    group = ps.tp_group()
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(t)] if ps.tp_rank() == 0 else None
    with _issued("gather", x):
        dist.gather(x, pieces, dst=_global_rank(group, 0), group=group)
    return torch.cat(pieces) if pieces is not None else None


def reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """Sum over TP, then keep this rank's contiguous 1/t of dim 0."""
    t = ps.tp_size()
    if t == 1:
        return x
    if ps.deterministic():
        return invariant_reduce_scatter(x)
    if ps.communicator() is not None:
        return _reduce_scatter_through(ps.communicator(), x)
    group = ps.tp_group()
    if _gloo() and x.dtype == torch.bfloat16:  # gloo sums bf16 too coarsely: the float32 route
        return reduce_scatter_start(x).wait()
    _check_divisible(x, "reduce_scatter")
    x = x.contiguous()
    out = _rows_over(x, t)
    with _issued("reduce_scatter", x):
        _reduce_scatter_tensor(out, x, group=group)  # synchronous, as all_gather
    return out


def _global_rank(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def _exchange(send: torch.Tensor, recv: torch.Tensor) -> list:
    """Send ``send`` to the next rank of the ring and receive ``recv`` from the previous, in flight."""
    t, r, group = ps.tp_size(), ps.tp_rank(), ps.tp_group()
    ops = [dist.P2POp(dist.isend, send, _global_rank(group, (r + 1) % t), group),
           dist.P2POp(dist.irecv, recv, _global_rank(group, (r - 1) % t), group)]
    return dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _fusion(op: str, rows: int, t: int) -> str:
    """``async_tp.choose``, except that a bound framework communicator keeps the plain collectives
    (they go through it, as the framework would issue them), and so does the deterministic mode (its
    sums are the invariant ones; a fused ring sums in the owner's order)."""
    return "off" if ps.communicator() is not None or ps.deterministic() else async_tp.choose(op, rows, t)


def all_gather_matmul(a_shard: torch.Tensor, b: torch.Tensor):
    """``(all_gather(a_shard), all_gather(a_shard) @ b)``, the gather fused with the GEMM where
    ``async_tp.choose`` says it pays: it is still g's forward (counted as one all_gather)."""
    t = ps.tp_size()
    if t == 1:
        return a_shard, a_shard @ b
    a_shard = a_shard.contiguous()
    impl = _fusion("all_gather_matmul", a_shard.shape[0] * t, t)
    if impl == "off":
        gathered = all_gather(a_shard)
        return gathered, gathered @ b
    a_shard, b = _as_autocast_would(a_shard, b)
    with _issued("all_gather", a_shard):
        if impl == "symm_mem":
            gathered, (out,) = torch.ops.symm_mem.fused_all_gather_matmul(
                a_shard, [b], 0, ps.tp_group().group_name, return_A=True)
        elif impl in ("split", "copy_engine"):
            gathered, out = _gather_beside_own_rows(a_shard, b, t, ps.tp_rank(), impl)
        else:
            gathered, out = _ring_all_gather_matmul(a_shard, b, t, ps.tp_rank())
    return gathered, out


def _gather_beside_own_rows(a_shard: torch.Tensor, b: torch.Tensor, t: int, r: int, impl: str):
    """The whole gather in flight while this rank's own rows are multiplied, then the other ranks' rows.
    "split" and "copy_engine" differ only in the transfer: an async NCCL all-gather, or copy-engine copies."""
    n = a_shard.shape[0]
    out = a_shard.new_empty((n * t,) + tuple(a_shard.shape[1:-1]) + (b.shape[-1],))
    gathered = _rows_times(a_shard, t)
    if impl == "copy_engine":
        wait = copy_engine.all_gather_start(a_shard, gathered, ps.tp_group().group_name, t, r)
    else:
        wait = _all_gather_tensor(gathered, a_shard, group=ps.tp_group(), async_op=True).wait
    torch.matmul(a_shard, b, out=out[r * n:(r + 1) * n])
    wait()
    for lo, hi in ((0, r * n), ((r + 1) * n, t * n)):  # the other ranks' rows, before and after ours
        if hi > lo:
            torch.matmul(gathered[lo:hi], b, out=out[lo:hi])
    return gathered, out


def _ring_all_gather_matmul(a_shard: torch.Tensor, b: torch.Tensor, t: int, r: int):
    """At step s this rank holds rank (r - s)'s shard: it multiplies it while passing it on."""
    n = a_shard.shape[0]
    out = a_shard.new_empty((n * t,) + tuple(a_shard.shape[1:-1]) + (b.shape[-1],))
    gathered = _rows_times(a_shard, t)
    gathered[r * n:(r + 1) * n].copy_(a_shard)
    for step in range(t):
        src = (r - step) % t
        works = _exchange(gathered[src * n:(src + 1) * n], gathered[(src - 1) % t * n:((src - 1) % t + 1) * n]) \
            if step < t - 1 else []
        torch.matmul(gathered[src * n:(src + 1) * n], b, out=out[src * n:(src + 1) * n])
        _wait(works)
    return gathered, out


def matmul_reduce_scatter_start(a: torch.Tensor, b: torch.Tensor) -> Pending:
    """``reduce_scatter(a @ b)``, the reduce-scatter fused with the GEMM where ``async_tp.choose`` says
    it pays (done when returned), else the GEMM then the reduce-scatter in flight. g-bar's forward."""
    return _matmul_reduce_scatter(a, b, in_flight=True)


def matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``reduce_scatter(a @ b)`` now: unfused, the synchronous collective (as ``all_gather``: an async
    start and its wait cost host time that nothing overlaps here)."""
    return _matmul_reduce_scatter(a, b, in_flight=False).wait()


def _matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, in_flight: bool) -> Pending:
    """Both of the above; ``in_flight``: leave the unfused reduce-scatter in flight (where the route allows)."""
    t = ps.tp_size()
    if t == 1:
        return Pending(a @ b)
    _check_divisible(a, "reduce_scatter")
    a = a.contiguous()
    impl = _fusion("matmul_reduce_scatter", a.shape[0], t)
    if impl == "split" and b.shape[-1] % 2 != 0:
        impl = "off"
    if impl == "off":
        if not in_flight or ps.communicator() is not None or ps.deterministic():
            return Pending(reduce_scatter(a @ b))
        return reduce_scatter_start(a @ b)
    a, b = _as_autocast_would(a, b)
    if impl == "split":  # leaves the collective when waited on
        pending = _in_flight("reduce_scatter", a, lambda: _split_matmul_reduce_scatter(a, b))
        return pending if in_flight else Pending(pending.wait())
    with _issued("reduce_scatter", a):
        if impl == "symm_mem":
            out = torch.ops.symm_mem.fused_matmul_reduce_scatter(a, b, "sum", 0, ps.tp_group().group_name)
        elif impl == "copy_engine":
            out = copy_engine.matmul_reduce_scatter(a, b, ps.tp_group().group_name, t, ps.tp_rank())
        else:
            out = _ring_matmul_reduce_scatter(a, b, t, ps.tp_rank())
    return Pending(out)


def _split_matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor) -> Pending:
    """The first half of the output columns reduce-scatters while the second half's GEMM runs."""
    half = b.shape[-1] // 2
    return _HalvesPending([_reduce_scatter_in_flight(a @ b[..., :half]),
                           _reduce_scatter_in_flight(a @ b[..., half:])])


def _ring_matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, t: int, r: int) -> torch.Tensor:
    """The partial sum for rank d starts at rank d + 1 and gains one term per hop, ending at d."""
    n = a.shape[0] // t
    keep, works, incoming = [], [], None
    for step in range(t):
        dest = (r - 1 - step) % t
        partial = a[dest * n:(dest + 1) * n] @ b
        if incoming is not None:
            _wait(works)
            partial += incoming
        if step == t - 1:
            return partial
        incoming = torch.empty_like(partial)
        keep += [partial, incoming]  # alive until their transfers are waited on
        works = _exchange(partial, incoming)
    raise AssertionError("unreachable")


def _sum_in_rank_order(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1] + ... + parts[t-1]``, left to right (bf16 / fp16 accumulate in float32)."""
    wide = parts.float() if parts.dtype in (torch.bfloat16, torch.float16) else parts
    total = wide[0].clone()
    for term in wide[1:]:
        total += term
    return total.to(parts.dtype)


def _exchange_chunks(x: torch.Tensor) -> torch.Tensor:
    """All-to-all of equal chunks: chunk r of ``x`` (dim 0) goes to rank r; returns the chunks received,
    in rank order. Always on torch.distributed over the bound group, also when a framework communicator
    is bound: sglang's ``GroupCoordinator.all_to_all_single`` is a CUDA-only op (it fails on CPU)."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=ps.tp_group())
    return out


def invariant_reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """Sum over TP in rank order, keeping this rank's contiguous 1/t of dim 0 (the deterministic mode's
    reduce-scatter; see the table above): each rank receives every rank's partial of its rows and adds
    them up locally, left to right."""
    t = ps.tp_size()
    if t == 1:
        return x
    _check_divisible(x, "reduce_scatter")
    with _issued("reduce_scatter", x):
        parts = _exchange_chunks(x.contiguous())
    return _sum_in_rank_order(parts.view((t, x.shape[0] // t) + tuple(x.shape[1:])))


def invariant_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over TP in rank order, on every rank (the deterministic mode's all-reduce): the invariant
    reduce-scatter of the flattened tensor (padded to a multiple of t), then an all-gather."""
    t = ps.tp_size()
    if t == 1:
        return x
    communicator = ps.communicator()
    flat = x.contiguous().view(-1)
    padded = -(-flat.numel() // t) * t
    flat = torch.cat([flat, flat.new_zeros(padded - flat.numel())]) if padded > flat.numel() else flat
    with _issued("all_reduce", x, communicator):
        mine = _sum_in_rank_order(_exchange_chunks(flat).view(t, padded // t))
        out = torch.empty_like(flat)
        if communicator is not None:
            communicator.all_gather_into_tensor(out, mine)
        else:
            _all_gather_tensor(out, mine, group=ps.tp_group())
    return out[: x.numel()].view(x.shape)


def all_gather_packed(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``all_gather`` of several tensors with equal dim 0 (any dtypes) in ONE collective: each row's bytes
    are concatenated, gathered, and split back (e.g. the MoE's hidden state with its routing)."""
    if ps.tp_size() == 1:
        return list(tensors)
    rows = [t.contiguous().view(t.shape[0], math.prod(t.shape[1:])) for t in tensors]
    raw = [r.view(torch.uint8) for r in rows]
    gathered = all_gather(torch.cat(raw, dim=1))
    out, offset = [], 0
    for t, r in zip(tensors, raw):
        piece = gathered[:, offset:offset + r.shape[1]].contiguous().view(t.dtype)
        out.append(piece.view((gathered.shape[0],) + tuple(t.shape[1:])))
        offset += r.shape[1]
    return out


def all_to_all(x: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int]) -> torch.Tensor:
    """Send ``send_rows[r]`` consecutive rows of ``x`` to rank r; returns the rows received, in rank order
    (``recv_rows[r]`` from rank r). Split sizes vary per call (expert dispatch)."""
    if ps.tp_size() == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(recv_rows),) + tuple(x.shape[1:]))
    with _issued("all_to_all", x):
        dist.all_to_all_single(out, x, list(recv_rows), list(send_rows), group=ps.tp_group())
    return out


def split(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous 1/t of dim 0 (no communication)."""
    t = ps.tp_size()
    if t == 1:
        return x
    _check_divisible(x, "split")
    rows = x.shape[0] // t
    return x[ps.tp_rank() * rows : (ps.tp_rank() + 1) * rows]


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from TP rank ``src`` to every TP rank (used off the hot path)."""
    if ps.tp_size() == 1:
        return obj
    box = [obj]
    group = ps.tp_group()
    with _issued("broadcast_object"):
        dist.broadcast_object_list(box, src=_global_rank(group, src), group=group)
    return box[0]


def barrier() -> None:
    if ps.tp_size() > 1:
        with _issued("barrier"):
            dist.barrier(group=ps.tp_group())


def mean_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """x's mean over a framework's own ``group`` (not TP: e.g. a loss over Megatron's data-parallel ranks),
    in a new tensor; not counted among the TP collectives."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    out = x.detach().clone()
    with _issued("all_reduce over a framework group"):
        dist.all_reduce(out, group=group)
    return out / size
