"""In-memory refit of a running ``sglang.Engine`` serving sp_core's models: each server TP rank loads the
shards its trainer rank of the same TP index wrote to shared memory, by the core's own parameter names
(the served model *is* the core's ``CausalLM``: same names, same shapes per rank at the same tp and MoE mode).
At another trainer tp or MoE mode, each server rank reads the rows it holds from every trainer rank's payload
instead (``reshard_plan``).

A refit is one call of ``apply(engine, payloads, weight_version)`` (``payloads``: one per server TP rank,
made by the trainer, ``sp_core_megatron.refit``) and is all or nothing:

1. **Stage** (``collective_rpc``, the adapter's ``sp_core_refit_stage``): every TP worker maps its payload's
   shared-memory buckets read-only and checks them against its own parameters -- no name missing, none
   unexpected, each shape and dtype equal, every value finite -- then the workers exchange their verdicts
   over sglang's TP CPU group (``all_gather_object``). If any worker refuses, every worker drops the
   mapping and the call returns ``success=False`` with the first refusal as one line; no weight changed.
2. **Commit** through sglang's own entry point, in a weight-update session: ``begin_weight_update()``,
   ``update_weights_from_tensor`` (one payload per rank, ``weight_version`` set) whose payload names the
   staged refit; the model's ``load_weights`` copies the staged views into its parameters
   (``commit``); sglang then records the weight version and flushes the radix cache;
   ``end_weight_update()``. A staging step is needed because sglang's update path has no way to refuse a
   payload: an exception in a loader ends the scheduler.

In-flight requests: sglang's tokenizer manager holds its ``model_update_lock`` as a reader for the whole
life of every request and takes it as a writer for the update. The commit therefore waits until every
request already running has finished -- with the old weights, reported as the old ``weight_version`` -- and
requests that arrive after the commit was asked for wait for it and run with the new weights (the lock
prefers a waiting writer). Nothing is rejected. Staging takes no lock: it runs between batches.
"""
from __future__ import annotations

import asyncio
import itertools
import pickle
import secrets
import time
from typing import Dict, List, Tuple

import torch

from sp_core.procs.cuda_ipc import KIND as CUDA_IPC
from sp_core.procs.refit_transport import finish_reading, kind_of, map_payload, release
from sp_core.procs.shared_memory import PayloadError

REFIT_NAME = "sp_core.refit"  # the one tensor of a commit payload: the staged refit's token
STAGE = "sp_core_refit_stage"
class RefitRefused(ValueError):
    pass


# -- payload: what a trainer rank hands its server rank (sp_core.procs.shared_memory) ------------------------

def check_payload(params: Dict[str, torch.Tensor], views: List[Tuple[str, torch.Tensor]]) -> str:
    """The first thing wrong with ``views`` as a full update of ``params`` (one line), or ""."""
    names = [name for name, _ in views]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        return f"{len(dup)} tensors given twice ({_some(dup)})"
    missing, unexpected = sorted(set(params) - set(names)), sorted(set(names) - set(params))
    if missing:
        return f"{len(missing)} tensors missing ({_some(missing)})"
    if unexpected:
        return f"{len(unexpected)} unexpected tensors ({_some(unexpected)}); expected the core's parameter names"
    for name, view in views:
        param = params[name]
        if tuple(view.shape) != tuple(param.shape):
            return f"{name}: shape {list(view.shape)}, this rank's parameter is {list(param.shape)}"
        if view.dtype != param.dtype:
            return f"{name}: dtype {view.dtype}, this rank's parameter is {param.dtype}"
    for name, view in views:
        if view.is_floating_point() and not bool(torch.isfinite(view).all()):
            return f"{name}: holds NaN or inf"
    return ""


def _some(names: List[str]) -> str:
    return ", ".join(names[:3]) + (f", ... {len(names) - 3} more" if len(names) > 3 else "")


# -- in each TP worker -----------------------------------------------------------------------------------------

def stage(scheduler, token: int, payloads: List[dict]) -> None:
    """The ``STAGE`` RPC: ``stage_model`` on this TP worker's model, the verdicts exchanged over sglang's TP CPU
    group."""
    from sp_core.mpu import collectives

    group = scheduler.tp_group
    stage_model(scheduler.tp_worker.model_runner.model, token, payloads, group.rank_in_group, group.world_size,
                agree=lambda problem: collectives.all_gather_objects_over(group.cpu_group, problem))


def stage_model(model, token: int, payloads: List[dict], rank: int = 0, world_size: int = 1, agree=None) -> None:
    """Map and check server rank ``rank``'s part of the payloads (either transport), agree with the other ranks
    (``agree(problem)``: every rank's problem, in rank order; one rank needs none), keep the copies for
    ``commit(model, token)``; ``RefitRefused`` (one line) if any rank refuses, with nothing kept. One payload per
    rank from a trainer of the same MoE mode: this rank's (matched layout); another count or MoE mode: every
    trainer rank's, resharded (``reshard_plan``). No sglang object is needed: the sglang worker's RPC (``stage``)
    and a plain process holding the core's model run this same code."""
    model._sp_core_refit = None
    copies, problem = _plan(model, payloads, rank, world_size)
    verdicts = agree(problem) if agree is not None else [problem]
    first = next(((r, v) for r, v in enumerate(verdicts) if v), None)
    if first is not None:
        copies = None  # drop the mappings now (CUDA IPC: the trainer may free its memory)
        raise RefitRefused(f"refit refused by server rank {first[0]}: {first[1]}")
    model._sp_core_refit = (token, copies)


def refit_model(model, payloads: List[dict], rank: int = 0, world_size: int = 1, agree=None) -> None:
    """``stage_model`` then ``commit``: a whole refit of ``model`` in this process, all or nothing."""
    token = secrets.randbits(62)
    stage_model(model, token, payloads, rank, world_size, agree)
    commit(model, token)


def _plan(model, payloads: List[dict], rank: int, world_size: int) -> Tuple[list, str]:
    """(copies, "") or (None, the first problem as one line)."""
    params = dict(model.named_parameters())
    try:
        if _matched(payloads, world_size, model):
            views = map_payload(payloads[rank])
            problem = check_payload(params, views)
            return (None if problem else [(name, None, None, 0, 0, view, 0) for name, view in views]), problem
        if any(kind_of(p) == CUDA_IPC for p in payloads):
            for at, payload in enumerate(payloads):
                if at % world_size == rank:
                    release(payload)
            raise RefitRefused(f"a reshard (trainer tp {payloads[0].get('layout', {}).get('tp')} or MoE mode to server "
                               f"tp {world_size}) reads every trainer rank's payload on every server rank; CUDA IPC "
                               f"handles have one reader each: refit with transport='shm'")
        return reshard_plan(params, payloads, world_size), ""
    except (RefitRefused, PayloadError) as err:
        return None, str(err)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        return None, f"unreadable payload ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def _matched(payloads: List[dict], server_tp: int, model) -> bool:
    """One payload per server rank from a trainer of this tp and MoE mode (this rank's parameters: the mode
    the engine was started in, sglang's ``--ep-size``); otherwise the payloads are resharded."""
    from sp_core.models.refit_pieces import moe_mode

    mode = moe_mode(model.parameters())
    return len(payloads) == server_tp and all(p.get("layout", {}).get("tp", server_tp) == server_tp and
                                               p.get("layout", {}).get("moe_parallel", mode) == mode for p in payloads)


def reshard_plan(params: Dict[str, torch.Tensor], payloads: List[dict], server_tp: int) -> list:
    """The copies that fill this rank's parameters from every trainer rank's payload of another tp or MoE mode:
    each checkpoint tensor's rows this rank holds (``sp_core.models.refit_pieces``: routed experts per expert,
    so whole experts and experts split over TP map onto each other), read from the trainer rank(s) that hold them
    (their payload's ``layout``), straight into the parameter -- no full tensor is built. A piece that is a whole
    tensor on one side is read or written along the other side's split dim. Refused (one line) when a tensor's
    checkpoint shape differs, it is split along another dim and neither side holds it whole, rows are missing, a
    tensor is unexpected, a dtype differs or a value is not finite."""
    from sp_core.models.refit_pieces import refit_keys, refit_pieces

    if any("layout" not in p for p in payloads):
        raise RefitRefused(f"{len(payloads)} payloads for a server of tp {server_tp}, without the trainer's layout "
                           f"to reshard them")
    trainer_tp = payloads[0]["layout"]["tp"]
    index: Dict[str, list] = {}
    for payload in payloads:
        views = dict(map_payload(payload))
        for name, described in payload["layout"]["pieces"].items():
            if name not in views:
                raise RefitRefused(f"{name}: described by trainer rank {payload['layout']['rank']} but not sent")
            for key, at, dim, start, rows, offset, full in described:
                view = views[name] if at is None else views[name][at]
                index.setdefault(key, []).append((dim, start, rows, view, offset, tuple(full)))
    copies = []
    for name, param in params.items():
        for key, at, dim, start, rows, offset, full in refit_pieces(name, param):
            if key not in index:
                raise RefitRefused(f"{key}: missing from the trainer's tensors")
            target = param if at is None else param[at]
            sources = [_along(key, s, dim, full, trainer_tp, server_tp) for s in index[key]]
            if dim not in {s[0] for s in sources} and rows == full[dim] and tuple(target.shape) == tuple(full):
                dim = sources[0][0]  # whole here, split there: written along the trainer's split dim
                start, rows, offset = 0, full[dim], 0
                sources = [_along(key, s, dim, full, trainer_tp, server_tp) for s in sources]
            end, here = start + rows, start
            for src_dim, src_start, src_rows, view, src_offset, _ in sorted(sources, key=lambda s: s[1]):
                if src_dim != dim:
                    raise RefitRefused(f"{key} cannot be mapped from trainer tp {trainer_tp} to server tp {server_tp}: "
                                       f"split along dim {src_dim} there, dim {dim} here, held whole on neither side")
                if view.dtype != param.dtype:
                    raise RefitRefused(f"{key}: dtype {view.dtype}, this rank's parameter is {param.dtype}")
                lo, hi = max(here, src_start), min(end, src_start + src_rows)
                if lo > here:
                    break
                if hi > lo:
                    copies.append((name, at, dim, offset + lo - start, hi - lo, view, src_offset + lo - src_start))
                    here = hi
                if here == end:
                    break
            if here < end:
                raise RefitRefused(f"{key}: rows {here}..{end} are in no trainer rank's payload")
    unexpected = sorted(set(index) - {key for name, param in params.items() for key in refit_keys(name, param)})
    if unexpected:
        raise RefitRefused(f"{len(unexpected)} unexpected tensors ({_some(unexpected)})")
    for name, _, dim, _, rows, view, src_offset in copies:
        if view.is_floating_point() and not bool(torch.isfinite(view.narrow(dim, src_offset, rows)).all()):
            raise RefitRefused(f"{name}: holds NaN or inf")
    return copies


def _along(key: str, source: tuple, dim: int, full: tuple, trainer_tp: int, server_tp: int) -> tuple:
    """A trainer piece ``(dim, start, rows, view, offset, full)``, checked against the checkpoint shape ``full``
    this rank expects, and re-described along ``dim`` when it is a whole tensor split along another dim."""
    src_dim, src_start, src_rows, view, src_offset, src_full = source
    if src_full != tuple(full):
        raise RefitRefused(f"{key} cannot be mapped from trainer tp {trainer_tp} to server tp {server_tp}: "
                           f"checkpoint shape {list(src_full)} there, {list(full)} here")
    if src_dim != dim and src_rows == full[src_dim] and tuple(view.shape) == tuple(full):
        return dim, 0, full[dim], view, 0, src_full
    return source


def load_weights(model, weights, load_checkpoint) -> None:
    """``SPCoreForCausalLM.load_weights``: a commit payload (``REFIT_NAME``) applies the staged refit; any
    other weights go to ``load_checkpoint(model, weights)`` (Hugging Face names, full tensors)."""
    weights = iter(weights)
    first = next(weights, None)
    if first is not None and first[0] == REFIT_NAME:
        commit(model, int(first[1].reshape(-1)[0]))
        return
    load_checkpoint(model, itertools.chain([] if first is None else [first], weights))


@torch.no_grad()
def commit(model, token: int) -> None:
    staged, model._sp_core_refit = getattr(model, "_sp_core_refit", None), None
    if staged is None or staged[0] != token:  # cannot raise here (it would end the scheduler): apply() stages first
        import logging

        logging.getLogger(__name__).error("sp_core refit: commit of a refit that was not staged; nothing loaded")
        return
    params = dict(model.named_parameters())
    for name, at, dim, offset, rows, view, src_offset in staged[1]:
        target = params[name].data if at is None else params[name].data[at]
        if dim is None:
            target.copy_(view)
        else:
            target.narrow(dim, offset, rows).copy_(view.narrow(dim, src_offset, rows))
    finish_reading([copy[5] for copy in staged[1]])  # CUDA IPC: the trainer may change its tensors once answered


# -- in the process that holds the sglang.Engine ---------------------------------------------------------------

def commit_payload(token: int) -> bytes:
    """sglang's per-rank payload of the commit: ``[(REFIT_NAME, tensor([token]))]``, plainly pickled (data inline)."""
    return pickle.dumps([(REFIT_NAME, torch.tensor([token], dtype=torch.int64))])


async def apply_async(engine, payloads: List[dict], weight_version: str, flush_cache: bool = True) -> dict:
    """``apply`` as a coroutine on the engine's event loop (to run beside ``engine.async_generate``)."""
    from sglang.srt.managers.io_struct import (BeginWeightUpdateReqInput, EndWeightUpdateReqInput,
                                               UpdateWeightsFromTensorReqInput)

    start = time.perf_counter()
    token = secrets.randbits(62)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, lambda: engine.collective_rpc(STAGE, token=token, payloads=list(payloads)))
    except AssertionError as err:
        message = str(err).split(f"{STAGE}: ", 1)[-1].splitlines()[0]
        return {"success": False, "message": message, "seconds": time.perf_counter() - start}
    tm = engine.tokenizer_manager
    ok, message = await tm.begin_weight_update(BeginWeightUpdateReqInput(selector="all"), None)
    if not ok:
        return {"success": False, "message": f"refit: sglang's begin_weight_update failed: {message}",
                "seconds": time.perf_counter() - start}
    try:
        server_tp = engine.server_args.tp_size
        req = UpdateWeightsFromTensorReqInput(serialized_named_tensors=[commit_payload(token)] * server_tp,
                                              load_format=None, flush_cache=flush_cache,
                                              weight_version=str(weight_version))
        ok, message = await tm.update_weights_from_tensor(req, None)
    finally:
        await tm.end_weight_update(EndWeightUpdateReqInput(), None)
    return {"success": bool(ok), "message": "" if ok else f"refit: sglang's update failed: {message}",
            "seconds": time.perf_counter() - start}


def apply(engine, payloads: List[dict], weight_version: str, flush_cache: bool = True) -> dict:
    """Refit a running ``sglang.Engine`` (started with the adapter) from per-rank payloads, all or nothing
    (module docstring). Returns ``{"success", "message" (one line when refused), "seconds"}``; on success the
    engine serves ``weight_version`` (``meta_info["weight_version"]`` of later requests)."""
    return engine.loop.run_until_complete(apply_async(engine, payloads, weight_version, flush_cache))
