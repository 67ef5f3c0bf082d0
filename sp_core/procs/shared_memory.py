"""The refit's host transport: named tensors packed into shared-memory files (``/dev/shm``) by one process and
mapped read-only, without a copy, by another. A payload is ``{"files": [[path, nbytes], ...], "tensors":
[[name, dtype, shape, file index, byte offset], ...]}``: small, picklable, and the only thing sent between the
processes; the bytes stay in the files."""
from __future__ import annotations

import os
import tempfile
from typing import List, Tuple

import torch

_ALIGN = 64
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
                               torch.uint8, torch.int8, torch.bool, torch.float8_e4m3fn)}


class PayloadError(ValueError):
    """A payload that does not describe tensors inside its files (one line)."""


def shm_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def write_buckets(tensors: List[Tuple[str, torch.Tensor]], directory: str, bucket_bytes: int) -> dict:
    """The tensors, packed into files of ``directory`` of at most ``bucket_bytes`` each (a larger tensor
    gets a file of its own); returns the payload that ``map_payload`` reads."""
    plan: List[List[Tuple[str, torch.Tensor, int]]] = [[]]
    sizes = [0]
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > bucket_bytes:
            plan.append([])
            sizes.append(0)
        plan[-1].append((name, tensor, sizes[-1]))
        sizes[-1] += -(-nbytes // _ALIGN) * _ALIGN
    files, entries = [], []
    for index, (bucket, size) in enumerate(zip(plan, sizes)):
        path = os.path.join(directory, f"bucket-{index}")
        with open(path, "wb") as f:
            f.truncate(size)
        buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8) if size else None
        for name, tensor, offset in bucket:
            nbytes = tensor.numel() * tensor.element_size()
            buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            entries.append([name, str(tensor.dtype), list(tensor.shape), index, offset])
        files.append([path, size])
        del buffer
    return {"files": files, "tensors": entries}


def map_payload(payload: dict) -> List[Tuple[str, torch.Tensor]]:
    """(name, read-only view) for every tensor of a payload; the views map the files (no copy)."""
    buffers = [torch.from_file(path, shared=False, size=int(nbytes), dtype=torch.uint8) if nbytes else
               torch.empty(0, dtype=torch.uint8) for path, nbytes in payload["files"]]
    out = []
    for name, dtype, shape, index, offset in payload["tensors"]:
        if dtype not in _DTYPES:
            raise PayloadError(f"{name}: dtype {dtype} is not a tensor dtype")
        dt = _DTYPES[dtype]
        numel = 1
        for n in shape:
            numel *= int(n)
        nbytes = numel * dt.itemsize
        buf = buffers[index]
        if offset < 0 or offset + nbytes > buf.numel():
            raise PayloadError(f"{name}: {nbytes} bytes at offset {offset} lie outside its bucket ({buf.numel()} bytes)")
        out.append((name, buf[offset:offset + nbytes].view(dt).view(*shape)))
    return out
