"""A framework communicator bound into sp_core.mpu (as the sglang adapter binds sglang's GroupCoordinator)
carries the forward collectives; torch.distributed's are not called. Results against single-process math."""
import torch

from sp_core import mpu
from sp_core.mpu import collectives
from sp_core.mpu.routes import torch_distributed
from support.multirank import run_ranks

HIDDEN = 6


class RecordingCommunicator:
    """GroupCoordinator's three methods the core uses, over a gloo group, recording each call. Like sglang's
    on CPU, its all-reduce sums in place."""

    def __init__(self, group, all_reduce, all_gather, reduce_scatter):
        self.group, self.calls = group, []
        self._all_reduce, self._all_gather, self._reduce_scatter = all_reduce, all_gather, reduce_scatter

    def all_reduce(self, x):
        self.calls.append("all_reduce")
        self._all_reduce(x, group=self.group)
        return x

    def all_gather_into_tensor(self, out, x):
        self.calls.append("all_gather")
        self._all_gather(out, x, group=self.group)

    def reduce_scatter_tensor(self, out, x):
        self.calls.append("reduce_scatter")
        self._reduce_scatter(out, x, group=self.group)


def _refuse(*args, **kwargs):
    raise AssertionError("torch.distributed called although a communicator is bound")


def _forward_through_communicator():
    import torch.distributed as dist

    from sp_core.layers import ColumnParallelLinear, RowParallelLinear

    t, r = mpu.default_context().size, mpu.default_context().rank
    comm = RecordingCommunicator(mpu.default_context().group, dist.all_reduce, torch_distributed.all_gather_tensor,
                                 torch_distributed.reduce_scatter_tensor)
    mpu.bind(mpu.default_context().group, communicator=comm)
    dist.all_reduce = torch_distributed.all_gather_tensor = torch_distributed.reduce_scatter_tensor = _refuse

    torch.manual_seed(0)  # the same weights and tokens on every rank
    x = torch.randn(5, HIDDEN)
    w1, w2 = torch.randn(8, HIDDEN), torch.randn(HIDDEN, 8)
    want = (x @ w1.t()) @ w2.t()  # single-process math
    up, down = ColumnParallelLinear(HIDDEN, 8, bias=False), RowParallelLinear(8, HIDDEN, bias=False)
    with torch.no_grad():
        up.weight.copy_(w1.chunk(t, 0)[r])
        down.weight.copy_(w2.chunk(t, 1)[r])
        results = {}
        for sp in (True, False):
            comm.calls.clear()
            with mpu.default_context().sequence_parallel_for(sp):
                out = mpu.exit_sequence_parallel(down(up(mpu.enter_sequence_parallel(x))), x.shape[0])
            results[sp] = (out, list(comm.calls))
    return want, results, x


def test_forward_collectives_go_through_the_bound_communicator():
    for want, results, x in run_ranks(2, _forward_through_communicator):
        out_sp, calls_sp = results[True]
        out_tp, calls_tp = results[False]
        torch.testing.assert_close(out_sp, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_tp, want, atol=1e-5, rtol=1e-5)
        assert calls_sp == ["all_gather", "reduce_scatter", "all_gather"]  # g, g-bar, region exit
        assert calls_tp == ["all_reduce"]  # f-bar


def _all_reduce_keeps_its_input():
    import torch.distributed as dist

    comm = RecordingCommunicator(mpu.default_context().group, dist.all_reduce, None, None)
    mpu.bind(mpu.default_context().group, communicator=comm)
    x = torch.full((3,), float(mpu.default_context().rank + 1))
    return collectives.all_reduce(mpu.default_context(), x), x, comm.calls


def test_in_place_communicator_leaves_the_callers_tensor_alone():
    for summed, x, calls in run_ranks(2, _all_reduce_keeps_its_input):
        assert calls == ["all_reduce"]
        assert summed.tolist() == [3.0, 3.0, 3.0] and x.tolist() != [3.0, 3.0, 3.0]
