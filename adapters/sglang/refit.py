"""In-memory refit of a running ``sglang.Engine`` serving sp_core's models: each server TP rank loads the
shards its trainer rank of the same TP index wrote to shared memory, by the core's own parameter names
(the served model *is* the core's ``CausalLM``: same names, same shapes per rank at the same tp and MoE mode).
At another trainer tp or MoE mode, each server rank reads the rows it holds from every trainer rank's payload
instead (``refit_reshard.reshard_plan``).

This file holds what sglang calls -- the adapter's RPCs (``stage``, ``outcome``) and the model's ``load_weights`` --
and the side of the process that holds the engine (``apply``). Each server rank's two passes are in
``refit_passes`` (``stage_model``, ``commit``; ``refit_model`` runs both without sglang), what a payload must be in
``refit_checks`` (``RefitRefused``), the reshard in ``refit_reshard``.

A refit is one call of ``apply(engine, payloads, weight_version)`` (``payloads``: one per server TP rank,
made by the trainer, ``sp_core_megatron.refit``) and is all or nothing:

1. **Stage**, pass 1 (``collective_rpc``, the adapter's ``sp_core_refit_stage``): every TP worker plans its
   copies from the payloads' descriptions alone -- no name missing, none unexpected or twice, each shape and
   dtype equal -- then reads every value it will copy, bucket by bucket, and checks it is finite. The workers
   exchange their verdicts over sglang's TP CPU group (``all_gather_object``). If any worker refuses, the call
   returns ``success=False`` with the first refusal as one line; no weight changed.
2. **Commit**, pass 2, through sglang's own entry point, in a weight-update session: ``begin_weight_update()``,
   ``update_weights_from_tensor`` (one payload per rank, ``weight_version`` set) whose payload names the
   staged refit; the model's ``load_weights`` makes the planned copies (``refit_passes.commit``); sglang then
   records the weight version and flushes the radix cache; ``end_weight_update()``. A staging step is needed
   because sglang's update path has no way to refuse a payload: an exception in a loader ends the scheduler.

Single pass or streamed. When each trainer rank's parameters fit one bucket, its bucket exists for the whole call:
the stage keeps its mapping and the commit copies from it. Otherwise the trainer streams its buckets
(``sp_core.procs.refit_stream``: at most two per trainer rank exist at once), pass 1 and pass 2 each wait for
every bucket in turn (at most the payload's ``timeout`` each), and the workers agree per bucket before
acknowledging it to the trainer (which then removes it) and, in pass 2, before copying it: every rank holds the
same buckets. Pass 1 records each bucket's checksum (crc32 of the files this rank reads); pass 2 copies a bucket
only if it is unchanged. A failure in pass 2 (a trainer rank that stalls or dies: the timeout; changed bytes)
stops at a bucket boundary: the call returns ``success=False`` with ``refit incomplete: k of n buckets copied,
then ...`` and the engine reports the version ``<weight_version>-incomplete`` (its weights are part old, part
new, until the next refit); with no bucket copied it is a refusal like pass 1's and the old version stays.

In-flight requests: sglang's tokenizer manager holds its ``model_update_lock`` as a reader for the whole
life of every request and takes it as a writer for the update. The commit therefore waits until every
request already running has finished -- with the old weights, reported as the old ``weight_version`` -- and
requests that arrive after the commit was asked for wait for it and run with the new weights (the lock
prefers a waiting writer). Nothing is rejected. A streamed commit holds the writer lock itself, with
generation paused (sglang's entry points then run without taking the lock again: whoever paused holds it),
from the session's start until its outcome is known and the version recorded: no request runs between two
buckets' copies, nor sees the version before the weights are whole. The stage takes no lock; running requests
wait while it runs (the scheduler is in the RPC) and continue with the old weights.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import secrets
import time
from typing import List

import torch

from sp_core_sglang.refit_passes import commit, raise_commit_failure, stage_model

REFIT_NAME = "sp_core.refit"  # the one tensor of a commit payload: the staged refit's token
STAGE = "sp_core_refit_stage"
OUTCOME = "sp_core_refit_outcome"
INCOMPLETE = "-incomplete"  # appended to the weight version a streamed refit that stopped half way leaves


# -- in each TP worker -----------------------------------------------------------------------------------------

def stage(scheduler, token: int, payloads: List[dict]) -> None:
    """The ``STAGE`` RPC: pass 1 of this rank's part of the payloads (``stage_model``) over sglang's TP CPU group."""
    group = scheduler.tp_group
    stage_model(scheduler.tp_worker.model_runner.model, token, payloads, group.rank_in_group, group.world_size,
                group.cpu_group)


def load_weights(model, weights, load_checkpoint) -> None:
    """``SPCoreForCausalLM.load_weights``: a commit payload (``REFIT_NAME``) applies the staged refit; any
    other weights go to ``load_checkpoint(model, weights)`` (Hugging Face names, full tensors)."""
    weights = iter(weights)
    first = next(weights, None)
    if first is not None and first[0] == REFIT_NAME:
        commit(model, int(first[1].reshape(-1)[0]))
        return
    load_checkpoint(model, itertools.chain([] if first is None else [first], weights))


def outcome(scheduler) -> None:
    """The ``OUTCOME`` RPC: raises the last commit's failure (one line), if it had one."""
    raise_commit_failure(scheduler.tp_worker.model_runner.model)


# -- in the process that holds the sglang.Engine ---------------------------------------------------------------

def commit_payload(token: int) -> bytes:
    """sglang's per-rank payload of the commit: ``[(REFIT_NAME, tensor([token]))]``, plainly pickled (data inline)."""
    return pickle.dumps([(REFIT_NAME, torch.tensor([token], dtype=torch.int64))])


async def apply_async(engine, payloads: List[dict], weight_version: str, flush_cache: bool = True) -> dict:
    """``apply`` as a coroutine on the engine's event loop (to run beside ``engine.async_generate``)."""
    start = time.perf_counter()
    token = secrets.randbits(62)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, lambda: engine.collective_rpc(STAGE, token=token, payloads=list(payloads)))
    except AssertionError as err:
        return _failed(_rpc_message(err, STAGE), start)
    tm = engine.tokenizer_manager
    if not any(p.get("stream") is not None for p in payloads):
        return await _commit(tm, engine.server_args.tp_size, token, weight_version, flush_cache, start)
    old_version = tm.config_value("weight_version")
    async with _exclusive(tm):  # no request runs from the first bucket's copy to the version's record
        answer = await _commit(tm, engine.server_args.tp_size, token, weight_version, flush_cache, start)
        if answer["success"]:
            try:
                await loop.run_in_executor(None, lambda: engine.collective_rpc(OUTCOME))
            except AssertionError as err:
                message = _rpc_message(err, OUTCOME)
                version = f"{weight_version}{INCOMPLETE}" if message.startswith("refit incomplete") else old_version
                await _set_version(tm, version)
                answer = _failed(message, start)
    return answer


async def _commit(tm, server_tp: int, token: int, weight_version: str, flush_cache: bool, start: float) -> dict:
    """sglang's weight-update session around one ``update_weights_from_tensor`` whose payload names the staged
    refit (``commit`` in each worker): the version recorded and the radix cache flushed by sglang."""
    from sglang.srt.managers.io_struct import (BeginWeightUpdateReqInput, EndWeightUpdateReqInput,
                                               UpdateWeightsFromTensorReqInput)

    ok, message = await tm.begin_weight_update(BeginWeightUpdateReqInput(selector="all"), None)
    if not ok:
        return _failed(f"refit: sglang's begin_weight_update failed: {message}", start)
    try:
        req = UpdateWeightsFromTensorReqInput(serialized_named_tensors=[commit_payload(token)] * server_tp,
                                              load_format=None, flush_cache=flush_cache,
                                              weight_version=str(weight_version))
        ok, message = await tm.update_weights_from_tensor(req, None)
    finally:
        await tm.end_weight_update(EndWeightUpdateReqInput(), None)
    return {"success": bool(ok), "message": "" if ok else f"refit: sglang's update failed: {message}",
            "seconds": time.perf_counter() - start}


@contextlib.asynccontextmanager
async def _exclusive(tm):
    """sglang's writer lock held and generation paused, so that sglang's update entry points run inside without
    taking the lock again (their convention: whoever paused the engine holds the writer lock). Requests running
    when it is asked for finish first (with the old weights); those arriving later wait. An engine the caller
    paused already is left to the caller."""
    from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput

    if tm.is_pause:
        yield
        return
    async with tm.model_update_lock.writer_lock:
        await tm.pause_generation(PauseGenerationReqInput(mode="in_place"))
        try:
            yield
        finally:
            await tm.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))


async def _set_version(tm, version: str) -> None:
    from sglang.srt.managers.io_struct import UpdateWeightVersionReqInput

    await tm.update_weight_version(UpdateWeightVersionReqInput(new_version=str(version), abort_all_requests=False))


def _rpc_message(err: AssertionError, method: str) -> str:
    return str(err).split(f"{method}: ", 1)[-1].splitlines()[0]


def _failed(message: str, start: float) -> dict:
    return {"success": False, "message": message, "seconds": time.perf_counter() - start}


def apply(engine, payloads: List[dict], weight_version: str, flush_cache: bool = True) -> dict:
    """Refit a running ``sglang.Engine`` (started with the adapter) from per-rank payloads, all or nothing
    (module docstring). Returns ``{"success", "message" (one line when refused), "seconds"}``; on success the
    engine serves ``weight_version`` (``meta_info["weight_version"]`` of later requests)."""
    return engine.loop.run_until_complete(apply_async(engine, payloads, weight_version, flush_cache))
