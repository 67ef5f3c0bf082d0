"""The trainer side of an in-memory refit: from a Megatron model built with the core (``SPCoreGPTModel``, or
megatron.core's ``GPTModel`` with ``get_sp_core_block_spec``, whose names are mapped to the core's) into
a running ``sglang.Engine`` served through the adapter (``sp_core_sglang.refit``), at matched layout (the same
tp and MoE mode on both sides) or resharded by the server (another tp or MoE mode).

Call ``refit(model, engine, weight_version)`` on every trainer rank (it is collective over the model's TP
group). Trainer rank r writes its own parameters -- the core's ``CausalLM``'s, by the core's names, exactly
the shards server rank r holds -- into shared-memory buckets (``/dev/shm``, ``sp_core.procs.shared_memory``),
planned alike on every rank (``plan_buckets``: a name's pieces in the same bucket everywhere); TP rank 0
collects the small per-rank descriptions and asks the engine to load them. No rank gathers anything: the bytes
moved per rank are that rank's parameter bytes.

Memory: when every rank's parameters fit one bucket (``bucket_bytes``), the bucket is written before the engine
call and kept until it answers. Otherwise the buckets are streamed during the call, twice (the engine checks all
of them before it copies any: ``sp_core.procs.refit_stream``), and a rank holds at most two buckets at once:
at most ``2 * max(bucket_bytes, its largest tensor rounded up to 64 bytes)`` of shared memory
(``RefitResult.peak_bytes``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import time
from typing import Dict, List, Optional, Tuple

import torch

from sp_core.models import ModelError
from sp_core.mpu import collectives
from sp_core.procs import refit_stream, shared_memory
from sp_core.procs.shared_memory import describe, nbytes_of, pack, padded, shm_root

DEFAULT_BUCKET_BYTES = 512 * 2**20
DEFAULT_TIMEOUT = 60.0  # seconds the engine waits for one bucket of a streamed refit


@dataclasses.dataclass
class RefitResult:
    success: bool
    message: str  # one line when refused
    weight_version: str
    seconds: float  # on this rank, from its first write to the engine's answer
    bytes_moved: int  # this rank's bytes written to shared memory (= its parameter bytes)
    full_tensors: int  # tensors larger than this rank's shard of them (0: nothing was gathered)
    buckets: int  # this rank's shared-memory buckets
    passes: int = 1  # 1: every bucket written once, before the engine was called; 2: streamed, each written twice
    peak_bytes: int = 0  # the most shared memory this rank held at once (its bucket files)
    answer: dict = dataclasses.field(default_factory=dict)  # what ``load`` returned on TP rank 0


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "language_model") and not hasattr(model, "decoder"):
        model = model.module  # DDP, Float16Module
    return model


def core_model(model):
    """The core's ``CausalLM`` inside a Megatron ``SPCoreGPTModel`` (through DDP / Float16Module wrappers,
    ``.module``), or a ``CausalLM`` itself."""
    from sp_core.models import CausalLM

    if isinstance(model, CausalLM):
        return model
    core = getattr(_unwrap(model), "language_model", None)
    if core is None or not hasattr(core, "parallel"):
        raise ModelError(f"refit: {type(model).__name__} is neither an SPCoreGPTModel nor a GPTModel built with "
                         f"get_sp_core_block_spec")
    return core


# megatron.core's GPTModel with the core's layer spec -> the core's names (sp_core_megatron.hf_weights' table)
_GPT_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.layer\.(.+)$")
_GPT_NAMES = {"decoder.final_layernorm.weight": "model.norm.weight",
              "embedding.word_embeddings.weight": "model.embed_tokens.weight", "output_layer.weight": "lm_head.weight"}
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def _is_gpt_model(model) -> bool:
    model = _unwrap(model)
    return hasattr(model, "decoder") and hasattr(model, "embedding")


def named_parameters(model) -> List[Tuple[str, torch.nn.Parameter]]:
    """(core name, parameter) of every parameter: the names the served model has."""
    if not _is_gpt_model(model):
        return list(core_model(model).named_parameters())
    out = []
    for name, param in _unwrap(model).named_parameters():
        match = _GPT_LAYER.match(name)
        core = f"model.layers.{match.group(1)}.{match.group(2)}" if match else _GPT_NAMES.get(name)
        if core is None:
            raise ModelError(f"refit: GPTModel parameter {name} has no counterpart in the core's model")
        out.append((core, param))
    return out


def parallel_of(model):
    """The model's parallel context (the core's layers keep it)."""
    if _is_gpt_model(model):
        return _unwrap(model).decoder.layers[0].parallel
    return core_model(model).parallel


def local_tensors(model) -> List[Tuple[str, torch.Tensor]]:
    """(core name, this rank's tensor) of every parameter: the names and shapes the served model has."""
    return [(name, param.detach()) for name, param in named_parameters(model)]


def _pieces(name: str, param, parallel, vocab_size: int) -> list:
    from sp_core.models.refit_pieces import refit_pieces

    if getattr(param, "shards", None) is None and name in _VOCAB and parallel.size > 1:
        rows = param.shape[0]  # Megatron's vocabulary-parallel layers: contiguous blocks of the padded vocabulary
        start = parallel.rank * rows
        return [(name, None, 0, start, max(0, min(rows, vocab_size - start)), 0, (vocab_size, *param.shape[1:]))]
    return refit_pieces(name, param)


def layout(model) -> dict:
    """What a server of another tp or MoE mode needs to place this rank's rows (``sp_core_sglang.refit_reshard``):
    the trainer's tp size and rank, and per tensor its pieces in the checkpoint tensors
    (``sp_core.models.refit_pieces``: ``[key, index, dim, start, rows, offset, full shape]``), and its MoE mode."""
    from sp_core.models.refit_pieces import moe_mode

    parallel = parallel_of(model)
    vocab = getattr(getattr(_unwrap(model), "config", None), "vocab_size", None) or 0
    return {"tp": parallel.size, "rank": parallel.rank, "moe_parallel": moe_mode(p for _, p in named_parameters(model)),
            "pieces": {name: [[key, index, dim, start, rows, offset, list(full)]
                              for key, index, dim, start, rows, offset, full in _pieces(name, param, parallel, vocab)]
                       for name, param in named_parameters(model)}}


def _full_tensor_count(model, tensors: List[Tuple[str, torch.Tensor]]) -> int:
    params = dict(named_parameters(model))
    return sum(1 for name, tensor in tensors if tensor.numel() > params[name].numel())


def refit(model, engine, weight_version, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
          timeout: float = DEFAULT_TIMEOUT, transport: Optional[str] = None) -> RefitResult:
    """Load this model's weights into ``engine`` (on TP rank 0: an ``sglang.Engine`` started with the adapter in
    this process, or the ``RemoteEngine`` handle of one in sp-core's engine host; the other ranks' argument is
    not used) as ``weight_version``. Collective over the model's TP group; every rank returns the same success and
    message, and its own byte count. ``bucket_bytes``: the most shared memory one bucket holds (a rank holds at
    most two at once, module docstring); ``timeout``: the seconds the engine waits for one streamed bucket;
    ``transport``: ``send``'s (by default CUDA IPC for parameters on GPUs, shared memory for parameters on CPU)."""
    tensors = local_tensors(model)
    result = send(parallel_of(model), tensors, engine, weight_version, bucket_bytes, layout=layout(model),
                  timeout=timeout, transport=transport)
    result.full_tensors = _full_tensor_count(model, tensors)
    return result


def _load(engine, payloads, weight_version):
    """A handle of sp-core's engine host has ``refit``; a plain ``sglang.Engine`` in this process goes through
    ``sp_core_sglang.refit.apply``."""
    if hasattr(engine, "refit"):
        return engine.refit(payloads, weight_version)
    from sp_core_sglang import refit as server

    return server.apply(engine, payloads, weight_version)


def plan_buckets(parallel, tensors: List[Tuple[str, torch.Tensor]], bucket_bytes: int) -> Dict[str, int]:
    """Each name's bucket, the same on every rank of ``parallel`` (TP rank 0 plans, over every rank's names, each
    name as large as its largest shard on any rank, and broadcasts the plan): the pieces of one tensor lie in the
    same bucket on every rank, and no rank's bucket holds more than ``bucket_bytes`` unless one tensor does."""
    sizes = [(name, nbytes_of(tensor)) for name, tensor in tensors]
    every = collectives.gather_objects_to_first(parallel, sizes)
    plan = None
    if parallel.rank == 0:
        largest: Dict[str, int] = {}
        for rank_sizes in every:
            on_rank: Dict[str, int] = {}
            for name, nbytes in rank_sizes:
                on_rank[name] = on_rank.get(name, 0) + padded(nbytes)
            for name, nbytes in on_rank.items():
                largest[name] = max(largest.get(name, 0), nbytes)
        plan = pack(list(largest.items()), bucket_bytes)
    return collectives.broadcast_object(parallel, plan)


def send(parallel, tensors: List[Tuple[str, torch.Tensor]], engine, weight_version,
         bucket_bytes: int = DEFAULT_BUCKET_BYTES, load=_load, layout: Optional[dict] = None,
         timeout: float = DEFAULT_TIMEOUT, transport: Optional[str] = None) -> RefitResult:
    """``refit``'s transport for any (name, tensor) list of this rank. ``transport``: "cuda_ipc" (handles of the
    tensors themselves, nothing copied, staged or allocated: ``sp_core.procs.cuda_ipc``; the tensors must stay
    unchanged until the engine has answered, by which time every server rank has finished reading them) or "shm";
    default: by the tensors' device (GPU: cuda_ipc, CPU: shm). Shared memory: the buckets planned alike on every rank
    (``plan_buckets``), the payload descriptions gathered on TP rank 0, ``load(engine, payloads, weight_version)``
    called there (default: ``engine.refit``); its answer broadcast. One bucket per rank: written before the call
    and kept until it returns. More: streamed during the call, twice, by a writer thread while TP rank 0 calls the
    engine in its own (``sp_core.procs.refit_stream``), at most two buckets at once; a rank whose writing failed
    raises its error once every rank has the engine's answer. Collective over ``parallel``'s group. ``layout``
    (``layout(model)``) lets a server of another tp reshard the payloads."""
    start = time.perf_counter()
    if _transport(tensors, transport) == "cuda_ipc":
        from sp_core.procs import cuda_ipc

        payload = dict(cuda_ipc.share(tensors), **({"layout": layout} if layout else {}))
        result = _answer(parallel, payload, engine, weight_version, load)
        return RefitResult(success=bool(result["success"]), message=result["message"],
                           weight_version=str(weight_version), seconds=time.perf_counter() - start,
                           bytes_moved=sum(nbytes_of(t) for _, t in tensors), full_tensors=0,
                           buckets=len(payload["storages"]), answer=result)
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ModelError(f"refit: bucket_bytes {bucket_bytes!r}; expected a positive number of bytes")
    bucket_of = plan_buckets(parallel, tensors, bucket_bytes)
    buckets = max(bucket_of.values(), default=0) + 1
    directory = os.path.join(shm_root(), f"sp-core-refit-{os.getpid()}-{secrets.token_hex(4)}")
    _remove_on_abort(directory)
    os.mkdir(directory, 0o700)
    try:
        payload = dict(describe(tensors, bucket_of, buckets, directory), **({"layout": layout} if layout else {}))
        if buckets > 1:
            payload["stream"] = {"timeout": float(timeout)}
        else:
            shared_memory.write_bucket(tensors, payload, 0, payload["files"][0][0])
        writer = (lambda: refit_stream.Writer(tensors, payload)) if buckets > 1 else None
        result = _answer(parallel, payload, engine, weight_version, load, writer)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        _forget(directory)
    sizes = [size for _, size in payload["files"]]
    held = sum(sizes) if buckets == 1 else max(a + b for a, b in zip(sizes + sizes, sizes[1:] + sizes))
    return RefitResult(success=bool(result["success"]), message=result["message"], weight_version=str(weight_version),
                       seconds=time.perf_counter() - start,
                       bytes_moved=sum(nbytes_of(t) for _, t in tensors), full_tensors=0,
                       buckets=buckets, passes=1 if buckets == 1 else 2, peak_bytes=held, answer=result)


def _answer(parallel, payload: dict, engine, weight_version, load, writer=None) -> dict:
    """Every rank's ``payload`` gathered on TP rank 0, ``load(engine, payloads, weight_version)`` called there (a
    call that fails becomes a refusal of one line) and its answer broadcast to every rank. ``writer``: starts this
    rank's ``refit_stream.Writer`` once the payloads are gathered (a streamed refit); a rank that could not write
    learns the answer, then raises its error."""
    payloads = collectives.gather_objects_to_first(parallel, payload)
    call = (lambda: load(engine, payloads, str(weight_version))) if parallel.rank == 0 else None
    writing = writer() if writer else None
    answer = refit_stream.answered(call) if call else None
    if call and writing:
        refit_stream.stop(payloads, "the engine call returned")
    failed = writing.join() if writing else None
    result = collectives.broadcast_object(parallel, answer)
    if failed is not None:
        raise failed
    return result


def _transport(tensors, transport: Optional[str]) -> str:
    from sp_core.procs.refit_transport import KINDS, kind_for

    if transport is None:
        try:
            return kind_for(tensors)
        except ValueError as err:
            raise ModelError(str(err)) from None
    if transport not in KINDS:
        raise ModelError(f"refit: transport {transport!r}; accepted: {', '.join(map(repr, KINDS))}")
    if transport != "shm" and any(t.device.type == "cpu" for _, t in tensors):
        raise ModelError(f"refit: transport {transport!r} shares GPU tensors; these are on the CPU (use 'shm')")
    return transport


def _remove_on_abort(path: str) -> None:
    """Inside ranks of ``sp_core.procs.launch``: removed if the run is aborted."""
    from sp_core.procs import launch

    launch.remove_on_abort(path)


def _forget(path: str) -> None:
    from sp_core.procs import launch

    launch.forget_on_abort(path)
