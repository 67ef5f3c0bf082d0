"""The refit's two transports behind one reader: a payload's ``kind`` says which made it -- ``"cuda_ipc"``
(``sp_core.procs.cuda_ipc``: handles of the trainer's own GPU tensors) or ``"shm"`` / none (``sp_core.procs.
shared_memory``: files in /dev/shm). The trainer's side picks the kind by where its tensors are."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from sp_core.procs import cuda_ipc, shared_memory
from sp_core.procs.shared_memory import PayloadError

SHM = "shm"
KINDS = (SHM, cuda_ipc.KIND)


def kind_for(tensors: Sequence[Tuple[str, torch.Tensor]]) -> str:
    """``"cuda_ipc"`` for tensors on a GPU, ``"shm"`` for tensors on the CPU (one line if mixed)."""
    return cuda_ipc.KIND if cuda_ipc.on_device(tensors) else SHM


def kind_of(payload: dict) -> str:
    kind = payload.get("kind", SHM)
    if kind not in KINDS:
        raise PayloadError(f"payload kind {kind!r}; accepted: {', '.join(map(repr, KINDS))}")
    return kind


def map_payload(payload: dict) -> List[Tuple[str, torch.Tensor]]:
    """(name, read-only view) of every tensor of a payload of either kind, mapped without a copy."""
    if kind_of(payload) == cuda_ipc.KIND:
        return cuda_ipc.map_payload(payload)
    return shared_memory.map_payload(payload)


def described(payload: dict) -> List[tuple]:
    """``(name, dtype, shape, bucket, offset, numel)`` of every tensor, checked against the payload's own sizes
    (``PayloadError``); nothing opened. A CUDA IPC payload is one bucket."""
    if kind_of(payload) == cuda_ipc.KIND:
        return cuda_ipc.described(payload)
    return shared_memory.described(payload)


def bucket_count(payload: dict) -> int:
    return 1 if kind_of(payload) == cuda_ipc.KIND else len(payload["files"])


def bucket_path(payload: dict, index: int) -> Optional[str]:
    """Where bucket ``index`` of a payload written before the engine was called lies (a file; None for CUDA IPC)."""
    return None if kind_of(payload) == cuda_ipc.KIND else payload["files"][index][0]


def map_bucket(payload: dict, index: int, path: Optional[str],
               entries: List[tuple]) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """``shared_memory.map_bucket`` for either kind: the bucket's bytes (None for CUDA IPC: device memory, opened
    whole) and a view of each tensor that lies in it (None for the others)."""
    if kind_of(payload) == cuda_ipc.KIND:
        return None, [view for _, view in cuda_ipc.map_payload(payload)]
    return shared_memory.map_bucket(payload, index, path, entries)


def release(payload: dict) -> None:
    """A payload this process will not map: give back what its producer keeps for it (CUDA IPC handles)."""
    if payload.get("kind") == cuda_ipc.KIND:
        cuda_ipc.release(payload)


def finish_reading(views: Sequence[torch.Tensor]) -> None:
    """Wait for the device work that reads ``views`` (a no-op for host views)."""
    cuda_ipc.finish_reading(views)
