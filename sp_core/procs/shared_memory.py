"""The refit's host transport: named tensors packed into shared-memory files (``/dev/shm``) by one process and
mapped read-only, without a copy, by another. A payload is ``{"files": [[path, nbytes], ...], "tensors":
[[name, dtype, shape, file index, byte offset], ...]}``: small, picklable, and the only thing sent between the
processes; the bytes stay in the files.

A payload can be described before any byte is written (``pack`` + ``describe``) and its files written one at a
time (``write_bucket``, to any path: a streamed refit writes each bucket twice, ``sp_core.procs.refit_stream``)."""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

_ALIGN = 64
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
                               torch.uint8, torch.int8, torch.bool, torch.float8_e4m3fn)}


class PayloadError(ValueError):
    """A payload that does not describe tensors inside its files (one line)."""


def shm_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def padded(nbytes: int) -> int:
    """A tensor's room in a bucket: its bytes rounded up to the alignment."""
    return -(-nbytes // _ALIGN) * _ALIGN


def nbytes_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def pack(sizes: List[Tuple[str, int]], bucket_bytes: int) -> Dict[str, int]:
    """The bucket of each name, in order: a bucket holds at most ``bucket_bytes`` (its tensors' ``padded`` bytes),
    unless one tensor alone is larger (it then fills a bucket of its own)."""
    bucket_of: Dict[str, int] = {}
    index, used = 0, 0
    for name, nbytes in sizes:
        room = padded(nbytes)
        if used and used + room > bucket_bytes:
            index, used = index + 1, 0
        bucket_of[name] = index
        used += room
    return bucket_of


def describe(tensors: List[Tuple[str, torch.Tensor]], bucket_of: Dict[str, int], buckets: int, directory: str) -> dict:
    """The payload of ``tensors`` laid out in ``buckets`` files of ``directory`` (``bucket_of``: each name's
    file), without writing anything; the entries are in the order of ``tensors``."""
    sizes = [0] * buckets
    entries = []
    for name, tensor in tensors:
        index = bucket_of[name]
        entries.append([name, str(tensor.dtype), list(tensor.shape), index, sizes[index]])
        sizes[index] += padded(nbytes_of(tensor))
    return {"files": [[os.path.join(directory, f"bucket-{i}"), size] for i, size in enumerate(sizes)],
            "tensors": entries}


def write_bucket(tensors: List[Tuple[str, torch.Tensor]], payload: dict, index: int, path: str) -> None:
    """File ``index`` of ``payload`` (described from ``tensors``) written at ``path``; it appears there complete
    (written under another name, then renamed)."""
    size = int(payload["files"][index][1])
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.truncate(size)
    buffer = torch.from_file(partial, shared=True, size=size, dtype=torch.uint8) if size else None
    for (_, tensor), (_, _, _, at, offset) in zip(tensors, payload["tensors"]):
        if at == index:
            buffer[offset:offset + nbytes_of(tensor)].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    del buffer
    os.rename(partial, path)


def write_buckets(tensors: List[Tuple[str, torch.Tensor]], directory: str, bucket_bytes: int) -> dict:
    """The tensors, packed into files of ``directory`` of at most ``bucket_bytes`` each (``pack``), all written;
    returns the payload that ``map_payload`` reads."""
    bucket_of = pack([(name, nbytes_of(t)) for name, t in tensors], bucket_bytes)
    payload = describe(tensors, bucket_of, max(bucket_of.values(), default=0) + 1, directory)
    for index, (path, _) in enumerate(payload["files"]):
        write_bucket(tensors, payload, index, path)
    return payload


def map_payload(payload: dict) -> List[Tuple[str, torch.Tensor]]:
    """(name, read-only view) for every tensor of a payload; the views map the files (no copy)."""
    views, entries = [None] * len(payload["tensors"]), described(payload)
    for index, (path, _) in enumerate(payload["files"]):
        for at, view in enumerate(map_bucket(payload, index, path, entries)[1]):
            if view is not None:
                views[at] = view
    return [(entry[0], view) for entry, view in zip(payload["tensors"], views)]


def map_bucket(payload: dict, index: int, path: str,
               entries: Optional[List[tuple]] = None) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """File ``index`` of ``payload``, found at ``path``, mapped read-only (no copy): its bytes, and a view of each
    tensor of the payload that lies in it (None for the others). ``entries``: ``described(payload)``, if known."""
    entries = described(payload) if entries is None else entries
    nbytes = int(payload["files"][index][1])
    buffer = (torch.from_file(path, shared=False, size=nbytes, dtype=torch.uint8) if nbytes else
              torch.empty(0, dtype=torch.uint8))
    return buffer, [buffer[offset:offset + numel * dtype.itemsize].view(dtype).view(shape) if at == index else None
                    for _, dtype, shape, at, offset, numel in entries]


def described(payload: dict) -> List[tuple]:
    """``(name, dtype, shape, file index, offset, numel)`` of every tensor of ``payload``, each checked to lie
    inside its file (``PayloadError`` otherwise); reads no file."""
    return checked_entries(payload["tensors"], [int(size) for _, size in payload["files"]], "file")


def checked_entries(tensors: List[list], sizes: List[int], holder: str, aligned: bool = False) -> List[tuple]:
    """``(name, dtype, shape, index, offset, numel)`` of each payload entry ``[name, dtype, shape, index, offset]``,
    checked to lie inside its ``holder`` (a file or a storage of ``sizes[index]`` bytes) and, if ``aligned``, on its
    dtype's alignment; ``PayloadError`` (one line) otherwise."""
    out = []
    for name, dtype, shape, index, offset in tensors:
        if dtype not in _DTYPES:
            raise PayloadError(f"{name}: dtype {dtype} is not a tensor dtype")
        dt = _DTYPES[dtype]
        numel = 1
        for n in shape:
            numel *= int(n)
        if not 0 <= index < len(sizes):
            raise PayloadError(f"{name}: in {holder} {index}, the payload has {len(sizes)}")
        nbytes = numel * dt.itemsize
        if offset < 0 or offset + nbytes > sizes[index] or (aligned and offset % dt.itemsize):
            raise PayloadError(f"{name}: {nbytes} bytes at offset {offset} lie outside its {holder} "
                               f"({sizes[index]} bytes){' or off its alignment' if aligned else ''}")
        out.append((name, dt, tuple(int(n) for n in shape), int(index), int(offset), numel))
    return out
