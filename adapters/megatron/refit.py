"""The trainer side of an in-memory refit: from a Megatron model built with the core (``SPCoreGPTModel``) into
a running ``sglang.Engine`` served through the adapter (``sp_core_sglang.refit``), at matched layout (the same
tp and MoE mode on both sides).

Call ``refit(model, engine, weight_version)`` on every trainer rank (it is collective over the model's TP
group). Trainer rank r writes its own parameters -- the core's ``CausalLM``'s, by the core's names, exactly
the shards server rank r holds -- into shared-memory buckets (``/dev/shm``, ``bucket_bytes`` at most per
file unless one tensor is larger); TP rank 0 collects the small per-rank descriptions and asks the engine
to load them. No rank gathers anything: the bytes moved per rank are that rank's parameter bytes. The
buckets live until the engine has answered (all-or-nothing needs every bucket checked before any is
copied), so the shared memory held at once is the rank's parameter bytes; ``bucket_bytes`` bounds each
segment. On GPU the same payload would carry CUDA IPC handles of the parameters instead (not built here).
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import tempfile
import time
from typing import List, Optional, Tuple

import torch

from sp_core.models import ModelError
from sp_core.mpu import collectives

DEFAULT_BUCKET_BYTES = 512 * 2**20
_ALIGN = 64


@dataclasses.dataclass
class RefitResult:
    success: bool
    message: str  # one line when refused
    weight_version: str
    seconds: float  # on this rank, from its first write to the engine's answer
    bytes_moved: int  # this rank's bytes written to shared memory (= its parameter bytes)
    full_tensors: int  # tensors larger than this rank's shard of them (0: nothing was gathered)
    buckets: int
    answer: dict = dataclasses.field(default_factory=dict)  # what ``load`` returned on TP rank 0


def core_model(model):
    """The core's ``CausalLM`` inside a Megatron model: through DDP / Float16Module wrappers (``.module``) to
    ``SPCoreGPTModel.language_model`` (a ``CausalLM`` itself is returned as is)."""
    from sp_core.models import CausalLM

    if isinstance(model, CausalLM):
        return model
    while hasattr(model, "module") and not hasattr(model, "language_model"):
        model = model.module
    core = getattr(model, "language_model", None)
    if core is None or not hasattr(core, "parallel"):
        raise ModelError(f"refit: {type(model).__name__} is not an SPCoreGPTModel; in-memory refit needs the core's "
                         f"model (build with sp_core_megatron.model.SPCoreGPTModel)")
    return core


def local_tensors(model) -> List[Tuple[str, torch.Tensor]]:
    """(core name, this rank's tensor) of every parameter: the names and shapes the served model has."""
    return [(name, param.detach()) for name, param in core_model(model).named_parameters()]


def layout(model) -> dict:
    """What a server of another tp needs to place this rank's rows (``sp_core_sglang.refit``'s reshard): the
    trainer's tp size and rank, and per tensor its pieces in the checkpoint tensors (``sharding.pieces``, keyed
    by checkpoint name)."""
    from sp_core.layers.sharding import pieces
    from sp_core.models.checkpoint import piece_key

    core = core_model(model)
    return {"tp": core.parallel.size, "rank": core.parallel.rank,
            "pieces": {name: [[piece_key(name, shard), dim, start, rows, offset]
                              for shard, dim, start, rows, offset in pieces(param)]
                       for name, param in core.named_parameters()}}


def _shm_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def write_buckets(tensors: List[Tuple[str, torch.Tensor]], directory: str, bucket_bytes: int) -> dict:
    """The tensors, packed into files of ``directory`` of at most ``bucket_bytes`` each (a larger tensor
    gets a file of its own); returns the payload that ``sp_core_sglang.refit.map_payload`` reads."""
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


def _full_tensor_count(model, tensors: List[Tuple[str, torch.Tensor]]) -> int:
    params = dict(core_model(model).named_parameters())
    return sum(1 for name, tensor in tensors if tensor.numel() > params[name].numel())


def refit(model, engine, weight_version, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> RefitResult:
    """Load this model's weights into ``engine`` (on TP rank 0: an ``sglang.Engine`` started with the adapter in
    this process, or the ``RemoteEngine`` handle of one in sp-core's engine host; the other ranks' argument is
    not used) as ``weight_version``. Collective over
    the model's TP group; every rank returns the same success and message, and its own byte count."""
    tensors = local_tensors(model)
    result = send(core_model(model).parallel, tensors, engine, weight_version, bucket_bytes, layout=layout(model))
    result.full_tensors = _full_tensor_count(model, tensors)
    return result


def _load(engine, payloads, weight_version):
    """A handle of sp-core's engine host has ``refit``; a plain ``sglang.Engine`` in this process goes through
    ``sp_core_sglang.refit.apply``."""
    if hasattr(engine, "refit"):
        return engine.refit(payloads, weight_version)
    from sp_core_sglang import refit as server

    return server.apply(engine, payloads, weight_version)


def send(parallel, tensors: List[Tuple[str, torch.Tensor]], engine, weight_version,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES, load=_load, layout: Optional[dict] = None) -> RefitResult:
    """``refit``'s transport for any (name, tensor) list of this rank: written to shared memory, the
    descriptions gathered on TP rank 0, ``load(engine, payloads, weight_version)`` called there (default:
    ``engine.refit``) while the buckets exist; its answer broadcast. Collective over ``parallel``'s group.
    ``layout`` (``layout(model)``) lets a server of another tp reshard the payloads."""
    start = time.perf_counter()
    directory = os.path.join(_shm_root(), f"sp-core-refit-{os.getpid()}-{secrets.token_hex(4)}")
    _remove_on_abort(directory)
    os.mkdir(directory, 0o700)
    try:
        payload = dict(write_buckets(tensors, directory, bucket_bytes), **({"layout": layout} if layout else {}))
        payloads = collectives.gather_objects_to_first(parallel, payload)
        result = collectives.broadcast_object(
            parallel, load(engine, payloads, str(weight_version)) if parallel.rank == 0 else None)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return RefitResult(success=bool(result["success"]), message=result["message"], weight_version=str(weight_version),
                       seconds=time.perf_counter() - start,
                       bytes_moved=sum(t.numel() * t.element_size() for _, t in tensors), full_tensors=0,
                       buckets=len(payload["files"]), answer=result)


def _remove_on_abort(path: str) -> None:
    """Inside ranks of ``sp_core.procs.launch``: removed if the run is aborted."""
    from sp_core.procs import launch

    launch.remove_on_abort(path)
