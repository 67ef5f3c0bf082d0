"""The refit's GPU transport: CUDA IPC handles of a process's own tensors, opened by another process as views of
the same device memory. Nothing is copied or allocated by the producer; the consumer reads the producer's bytes
in place (and must only read them).

A payload is ``{"kind": "cuda_ipc", "producer": [pid, device uuid], "storages": [[handle, nbytes], ...],
"tensors": [[name, dtype, shape, storage index, byte offset], ...]}`` -- the shared-memory payload's shape
(``sp_core.procs.shared_memory``) with storages in place of files. One handle per storage: tensors that are
views of one storage (Megatron's DDP keeps parameters as views of one buffer) share it. A handle is
``torch.multiprocessing.reductions.reduce_tensor``'s description of a byte view of the whole storage: torch
records an event on the producer's current stream, which the consumer's stream waits for when it opens the
handle, and counts the handle's one consumer in a shared-memory counter that keeps the producer's block
allocated (in torch's limbo) until the consumer has released its mapping.

What torch requires, and what follows here:
- a handle cannot be opened in the process that made it: refused in one line;
- each handle is meant to be opened exactly once: the consumer of a payload opens every storage once (slices
  of it give the tensors), and ``release`` gives back the handles of a payload that will not be opened;
- the producer's tensors must stay alive and unchanged until the consumer has finished reading: the refit's
  sender keeps them until the server has answered, and the server synchronises its device after copying
  (``finish_reading``) before it answers;
- the consumer opens the handle on the producer's device, found here by its UUID (device indices differ
  between processes with different ``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch

from sp_core.procs.shared_memory import PayloadError, checked_entries

KIND = "cuda_ipc"
_DEVICE_ARG = 6  # storage_device in rebuild_cuda_tensor's arguments


def on_device(tensors: Sequence[Tuple[str, torch.Tensor]]) -> bool:
    """Whether every tensor is on a CUDA device (False when every one is on the CPU); one line if mixed."""
    kinds = {t.device.type for _, t in tensors}
    if kinds <= {"cpu"}:
        return False
    if kinds == {"cuda"}:
        return True
    raise ValueError(f"refit: tensors on {sorted(kinds)}; accepted: all on CUDA devices (CUDA IPC) or all on the "
                     f"CPU (shared memory)")


def _uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def share(tensors: Sequence[Tuple[str, torch.Tensor]]) -> dict:
    """The payload of these CUDA tensors (contiguous, on one device): handles of their storages. Allocates
    nothing on the device. The tensors must outlive the consumer's use of the payload."""
    from torch.multiprocessing.reductions import reduce_tensor

    devices = {t.device for _, t in tensors}
    if len(devices) != 1:
        raise ValueError(f"refit: CUDA IPC payload of tensors on {len(devices)} devices; accepted: one device")
    device = devices.pop()
    storages, index, entries = [], {}, []
    for name, tensor in tensors:
        if not tensor.is_contiguous():
            raise ValueError(f"refit: {name} is not contiguous; CUDA IPC shares contiguous tensors only")
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in index:
            whole = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (storage.nbytes(),), (1,))
            index[key] = len(storages)
            storages.append([list(reduce_tensor(whole)[1]), storage.nbytes()])
        entries.append([name, str(tensor.dtype), list(tensor.shape), index[key],
                        tensor.storage_offset() * tensor.element_size()])
    return {"kind": KIND, "producer": [os.getpid(), _uuid(device.index)], "storages": storages, "tensors": entries}


def _local_index(uuid: str) -> int:
    if not torch.cuda.is_available():
        raise PayloadError("a CUDA IPC payload, and this process sees no CUDA device; use the shared-memory "
                           "transport (refit(..., transport='shm'))")
    for index in range(torch.cuda.device_count()):
        if _uuid(index) == uuid:
            return index
    raise PayloadError(f"a CUDA IPC payload from GPU {uuid}, which this process does not see "
                       f"(CUDA_VISIBLE_DEVICES); the server must see the trainer's GPU")


def _args(handle: list, device: int) -> list:
    args = list(handle)
    args[_DEVICE_ARG] = device
    return args


def map_payload(payload: dict) -> List[Tuple[str, torch.Tensor]]:
    """(name, view of the producer's memory) for every tensor of a payload, on the producer's device. Every
    storage's handle is opened once, here; read the views only, and drop them when done (after
    ``finish_reading``) so that the producer can free its memory."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    pid, uuid = payload["producer"]
    if pid == os.getpid():
        release(payload)
        raise PayloadError("a CUDA IPC payload opened in the process that made it (torch cannot open its own "
                           "handles); the server must be another process")
    try:
        device = _local_index(uuid)
        entries = _entries(payload)
    except PayloadError:
        release(payload)
        raise
    buffers = []
    for at, (handle, _) in enumerate(payload["storages"]):
        try:
            buffers.append(rebuild_cuda_tensor(*_args(handle, device)))
        except Exception:
            _release_handles(payload["storages"][at + 1:], device)
            raise
    return [(name, buffers[index][offset:offset + numel * dt.itemsize].view(dt).view(shape))
            for name, dt, shape, index, offset, numel in entries]


def described(payload: dict) -> List[tuple]:
    """``(name, dtype, shape, 0, offset, numel)`` of every tensor of ``payload`` (the shared-memory payload's
    ``described``, every tensor in one bucket: the payload is opened at once), each checked to lie inside its
    storage and on its dtype's alignment (``PayloadError`` otherwise); opens no handle."""
    return [(name, dt, shape, 0, offset, numel) for name, dt, shape, _, offset, numel in _entries(payload)]


def _entries(payload: dict) -> List[tuple]:
    return checked_entries(payload["tensors"], [int(size) for _, size in payload["storages"]], "storage", aligned=True)


def _release_handles(storages, device: int) -> None:
    for handle, _ in storages:
        args = _args(handle, device)
        if args[7] is not None and args[8]:  # storage_handle, storage_size_bytes
            torch.UntypedStorage._release_ipc_counter(args[11], args[12], device=device)


def release(payload: dict) -> None:
    """Give back a payload's handles without opening them (a payload this process will not read): the producer
    may then free the memory once it drops its tensors."""
    try:
        device = _local_index(payload["producer"][1])
    except PayloadError:
        device = 0
    _release_handles(payload["storages"], device)


def finish_reading(views: Sequence[torch.Tensor]) -> None:
    """Wait until the device work that reads ``views`` (copies out of them) is done: the producer may change or
    free its tensors once told the refit is over."""
    for device in {v.device for v in views if v.device.type == "cuda"}:
        torch.cuda.synchronize(device)
