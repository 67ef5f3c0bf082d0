"""Async TP with the copy engines (CUDA): the rows another rank needs move by cudaMemcpy over NVLink from
or into a symmetric-memory workspace, on a side stream, while this stream multiplies. NCCL's kernels
take SMs from the GEMM beside them (on H200 a collective in flight hid almost nothing: docs/async_tp.md);
a copy engine takes none.

One workspace per TP group, grown (collectively: every rank has the same shapes under SP) to the
largest call. Two device barriers per call: the first keeps a peer from writing into, or reading, a
buffer that an earlier call still uses; the second marks every rank's rows as in place. That protocol
assumes the calls of a group come in one stream order, as the layers issue them (autograd runs a
backward on its forward's stream); it needs every TP rank on one host with CUDA peer access.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from sp_core.mpu import platform


class _Workspace:
    def __init__(self, group_name: str):
        self.group_name, self.nbytes, self.handle = group_name, 0, None
        self.outgrown: List[tuple] = []

    def grown_to(self, nbytes: int):
        if nbytes > self.nbytes or self.handle is None:
            import torch.distributed._symmetric_memory as symm_mem

            if platform.capturing_graph():
                raise RuntimeError(
                    f"copy_engine async TP: its workspace must grow to {nbytes} bytes, which cannot happen during "
                    "CUDA graph capture; run one call of the largest size before capturing, or set "
                    "SP_CORE_ASYNC_TP=off")
            # A peer's copies from the old buffer may still be queued: every device drains before the
            # (host-side, collective) rendezvous. The old buffer is kept (freed with the process): a run that
            # freed it at once hung (docs/async_tp.md); freeing it after the rendezvous was not run on GPUs.
            platform.synchronize()
            if self.handle is not None:
                self.outgrown.append((self.buffer, self.handle))
            size = 1 << max(nbytes - 1, 1).bit_length()  # powers of two: few growths as batches vary
            buffer = symm_mem.empty(size, dtype=torch.uint8, device=platform.current_device())
            try:
                handle = symm_mem.rendezvous(buffer, self.group_name)
            except Exception as err:
                raise RuntimeError(
                    "copy_engine async TP needs every TP rank on one host with CUDA peer access (the symmetric-"
                    f"memory rendezvous failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                    "set SP_CORE_ASYNC_TP=split or off") from err
            self.buffer, self.handle, self.nbytes = buffer, handle, size
        return self.handle


_WORKSPACES: Dict[str, _Workspace] = {}


def _workspace(group_name: str, nbytes: int):
    if group_name not in _WORKSPACES:
        _WORKSPACES[group_name] = _Workspace(group_name)
    return _WORKSPACES[group_name].grown_to(nbytes)


def all_gather_start(shard: torch.Tensor, gathered: torch.Tensor, group_name: str, t: int, r: int):
    """Start filling ``gathered`` (t x shard's rows) with every rank's shard: this rank's own rows now, the
    others' copied in on the side stream. Returns the wait: after it, this stream may read ``gathered``."""
    n = shard.shape[0]
    hdl = _workspace(group_name, shard.numel() * shard.element_size())
    hdl.barrier(channel=0)
    hdl.get_buffer(r, shard.shape, shard.dtype).copy_(shard)
    hdl.barrier(channel=1)
    here, side = platform.current_stream(), platform.side_stream(shard.device.index)
    side.wait_stream(here)
    with platform.on_stream(side):
        for step in range(1, t):
            peer = (r + step) % t
            gathered[peer * n:(peer + 1) * n].copy_(hdl.get_buffer(peer, shard.shape, shard.dtype))
    gathered[r * n:(r + 1) * n].copy_(shard)
    return lambda: here.wait_stream(side)


def matmul_reduce_scatter(a: torch.Tensor, b: torch.Tensor, group_name: str, t: int, r: int) -> torch.Tensor:
    """reduce_scatter(a @ b): each peer's rows are multiplied first and pushed into its workspace slot for
    this rank while the next GEMM runs; this rank's own rows last, then the peers' slots added to them."""
    n, width = a.shape[0] // t, b.shape[-1]
    hdl = _workspace(group_name, t * n * width * a.element_size())
    hdl.barrier(channel=0)
    here, side = platform.current_stream(), platform.side_stream(a.device.index)
    in_flight: List[torch.Tensor] = []  # alive until the side stream has copied them
    for step in range(1, t):
        peer = (r + step) % t
        partial = a[peer * n:(peer + 1) * n] @ b
        side.wait_stream(here)
        with platform.on_stream(side):
            hdl.get_buffer(peer, (t, n, width), a.dtype)[r].copy_(partial)
        in_flight.append(partial)
    mine = a[r * n:(r + 1) * n] @ b
    here.wait_stream(side)
    hdl.barrier(channel=1)
    slots = hdl.get_buffer(r, (t, n, width), a.dtype)
    # t - 1 roundings in bf16, in an order that depends on which rank owns the rows from t = 3 on (the
    # deterministic mode never fuses). One rounding (slots.sum) would not depend on it; it was not run on
    # the GPUs, so the measured form stays.
    for source in range(t):
        if source != r:
            mine += slots[source]
    return mine
