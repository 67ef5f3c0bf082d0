"""The refit's GPU transport on the trainer side: each rank hands its server rank CUDA IPC handles of its own
parameter tensors (``sp_core.procs.cuda_ipc``) -- nothing is copied, staged or allocated on the trainer; the
server reads the trainer's memory in place. The tensors are kept alive and unchanged (the caller must not step
the optimizer meanwhile) until the engine has answered, by which time every server rank has finished reading
them (``sp_core_sglang.refit_passes.commit`` synchronises its device before answering) and dropped its mappings."""
from __future__ import annotations

import time
from typing import List, Optional, Tuple

import torch

from sp_core.mpu import collectives
from sp_core.procs import cuda_ipc


def send_handles(parallel, tensors: List[Tuple[str, torch.Tensor]], engine, weight_version, load,
                 layout: Optional[dict] = None):
    """``sp_core_megatron.refit.send`` for tensors on a GPU: the payload carries handles, not bytes. Collective
    over ``parallel``'s group; returns a ``RefitResult`` (``buckets``: the storages shared)."""
    from sp_core_megatron.refit import RefitResult

    start = time.perf_counter()
    payload = dict(cuda_ipc.share(tensors), **({"layout": layout} if layout else {}))
    payloads = collectives.gather_objects_to_first(parallel, payload)
    result = collectives.broadcast_object(
        parallel, load(engine, payloads, str(weight_version)) if parallel.rank == 0 else None)
    return RefitResult(success=bool(result["success"]), message=result["message"], weight_version=str(weight_version),
                       seconds=time.perf_counter() - start,
                       bytes_moved=sum(t.numel() * t.element_size() for _, t in tensors), full_tensors=0,
                       buckets=len(payload["storages"]), answer=result)
