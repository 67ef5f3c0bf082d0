"""In-memory refit of a running ``sglang.Engine`` serving sp_core's models: each server TP rank loads the
shards its trainer rank of the same TP index wrote to shared memory, by the core's own parameter names
(the served model *is* the core's ``CausalLM``: same names, same shapes per rank at the same tp and MoE mode).
At another trainer tp or MoE mode, each server rank reads the rows it holds from every trainer rank's payload
instead (``reshard_plan``).

A refit is one call of ``apply(engine, payloads, weight_version)`` (``payloads``: one per server TP rank,
made by the trainer, ``sp_core_megatron.refit``) and is all or nothing:

1. **Stage**, pass 1 (``collective_rpc``, the adapter's ``sp_core_refit_stage``): every TP worker plans its
   copies from the payloads' descriptions alone -- no name missing, none unexpected or twice, each shape and
   dtype equal -- then reads every value it will copy, bucket by bucket, and checks it is finite. The workers
   exchange their verdicts over sglang's TP CPU group (``all_gather_object``). If any worker refuses, the call
   returns ``success=False`` with the first refusal as one line; no weight changed.
2. **Commit**, pass 2, through sglang's own entry point, in a weight-update session: ``begin_weight_update()``,
   ``update_weights_from_tensor`` (one payload per rank, ``weight_version`` set) whose payload names the
   staged refit; the model's ``load_weights`` makes the planned copies (``commit``); sglang then records the
   weight version and flushes the radix cache; ``end_weight_update()``. A staging step is needed because
   sglang's update path has no way to refuse a payload: an exception in a loader ends the scheduler.

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
import zlib
from typing import Dict, List, Optional, Tuple

import torch

from sp_core.mpu import collectives
from sp_core.procs import refit_stream, refit_transport
from sp_core.procs.cuda_ipc import KIND as CUDA_IPC
from sp_core.procs.refit_transport import finish_reading
from sp_core.procs.shared_memory import PayloadError
from sp_core_sglang.refit_checks import RefitRefused, check_payload, first_not_finite, source_view
from sp_core_sglang.refit_reshard import matched_layout, reshard_plan

REFIT_NAME = "sp_core.refit"  # the one tensor of a commit payload: the staged refit's token
STAGE = "sp_core_refit_stage"
OUTCOME = "sp_core_refit_outcome"
INCOMPLETE = "-incomplete"  # appended to the weight version a streamed refit that stopped half way leaves
_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError)


# -- in each TP worker -----------------------------------------------------------------------------------------

def stage(scheduler, token: int, payloads: List[dict]) -> None:
    """The ``STAGE`` RPC: pass 1 of this rank's part of the payloads (``stage_model``) over sglang's TP CPU group."""
    group = scheduler.tp_group
    stage_model(scheduler.tp_worker.model_runner.model, token, payloads, group.rank_in_group, group.world_size,
                group.cpu_group)


def stage_model(model, token: int, payloads: List[dict], rank: int = 0, size: int = 1, group=None) -> None:
    """Pass 1 on server rank ``rank`` of ``size`` (``group``: their CPU process group, None for one rank): plan the
    copies from the payloads' descriptions, read every value once and check it, agree with the other ranks; keep
    the plan for ``commit``. One payload per rank from a trainer of the same MoE mode: this rank's (matched
    layout); another count or MoE mode: every trainer rank's, resharded (``reshard_plan``). Raises
    ``RefitRefused`` (one line, the same on every rank) and keeps nothing if any rank refuses."""
    model._sp_core_refit = None
    params = dict(model.named_parameters())
    refit = _Refit(payloads, rank, size, group)
    problem, copies = "", []
    try:
        refit.read_descriptions()
        matched = matched_layout(payloads, size, model)
        if not matched and any(refit_transport.kind_of(p) == CUDA_IPC for p in payloads):
            raise RefitRefused(f"a reshard (to server tp {size} or another MoE mode) reads every trainer rank's "
                               f"payload on every server rank; CUDA IPC handles have one reader each: refit with "
                               f"transport='shm'")
        if matched:
            problem = check_payload(params, refit.entries[rank])
            copies = [] if problem else [(name, None, None, 0, 0, (rank, at, None), 0)
                                         for at, (name, *_) in enumerate(refit.entries[rank])]
        else:
            copies = reshard_plan(params, payloads, size, refit.entries)
    except (RefitRefused, PayloadError) as err:
        problem = str(err)
    except _READ_ERRORS as err:
        problem = _unreadable(err)
    try:
        if refit.streamed or problem:  # a refusal from the descriptions alone stops the trainer before its first byte
            refit.settle(problem)
        refit.check_pass(copies)
    except RefitRefused:
        refit.release_unopened()
        raise
    model._sp_core_refit = (token, refit)


def _unreadable(err: BaseException) -> str:
    return f"unreadable payload ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


class _Refit:
    """One refit on one server rank: its copies grouped by the trainer bucket they read, and the two passes over
    those buckets -- read from the files as they are (a single pass: every bucket written before the engine was
    called) or as the trainer streams them (``sp_core.procs.refit_stream``: waited for, acknowledged, and checked
    to hold in pass 2 the bytes pass 1 checked)."""

    def __init__(self, payloads: List[dict], rank: int, size: int, group):
        self.payloads, self.rank, self.size, self.group = payloads, rank, size, group
        self.streamed = any(p.get("stream") is not None for p in payloads)
        self.entries: List[list] = []  # shared_memory.described of each payload
        self.buckets = 0
        self.by_bucket: Dict[int, list] = {}
        self.views: Dict[tuple, torch.Tensor] = {}  # a single pass: kept from the check to the copy
        self.sums: Dict[int, int] = {}  # a stream: each bucket's checksum in pass 1

    def read_descriptions(self) -> None:
        """Every payload's tensors (``shared_memory.described``), checked to lie in their files; a stream needs
        every trainer rank streaming the same buckets (they were planned together)."""
        if self.streamed and (any(p.get("stream") is None for p in self.payloads) or
                              len({len(p["files"]) for p in self.payloads}) != 1):
            raise RefitRefused("a streamed refit needs every trainer rank to stream the same number of buckets")
        self.entries = [refit_transport.described(p) for p in self.payloads]
        self.buckets = max(refit_transport.bucket_count(p) for p in self.payloads)

    def release_unopened(self) -> None:
        """A refused refit: give back the CUDA IPC handles of the payloads this rank reads and did not open (each
        server rank reads its own: payloads[rank], and every size-th one after it)."""
        for at in range(self.rank, len(self.payloads), self.size):
            if not any(key[0] == at for key in self.views):
                refit_transport.release(self.payloads[at])

    def agree(self, problem: str, bucket: Optional[int] = None, pass_: int = 1) -> str:
        """Agree with the other ranks on ``problem`` (every rank's; the first one wins): the refusal (one line,
        the same on every rank, the stream stopped) or "" (``bucket`` acknowledged to the trainer)."""
        verdicts = [problem] if self.group is None or self.size == 1 else \
            collectives.all_gather_objects_over(self.group, problem)
        first = next(((rank, v) for rank, v in enumerate(verdicts) if v), None)
        if first is not None:
            message = f"refit refused by server rank {first[0]}: {first[1]}"
            if self.streamed and self.rank == 0:
                refit_stream.stop(self.payloads, message)
            return message
        if self.streamed and self.rank == 0 and bucket is not None:
            refit_stream.ack(self.payloads, bucket, pass_)
        return ""

    def settle(self, problem: str, bucket: Optional[int] = None) -> None:
        """``agree`` in pass 1: a refusal is raised (``RefitRefused``)."""
        message = self.agree(problem, bucket, 1)
        if message:
            raise RefitRefused(message)

    def _map(self, bucket: int, pass_: int) -> Tuple[Dict[tuple, torch.Tensor], int]:
        """The views of this rank's sources in ``bucket`` (by ``(payload, tensor)``) and their files' checksum."""
        which = sorted({copy[5][0] for copy in self.by_bucket.get(bucket, [])})
        if self.streamed:
            paths = refit_stream.wait_buckets(self.payloads, which, bucket, pass_)
        else:
            paths = {p: refit_transport.bucket_path(self.payloads[p], bucket) for p in which}
        views, checksum = {}, 0
        for p, path in paths.items():
            data, mapped = refit_transport.map_bucket(self.payloads[p], bucket, path, self.entries[p])
            if self.streamed:
                checksum = zlib.crc32(data.numpy(), checksum)
            views.update({(p, at): view for at, view in enumerate(mapped) if view is not None})
        return views, checksum

    def check_pass(self, copies: list) -> None:
        """Pass 1: every value this rank will copy is read and checked, bucket by bucket."""
        self.by_bucket = {}
        for copy in copies:
            p, at, _ = copy[5]
            self.by_bucket.setdefault(self.entries[p][at][3], []).append(copy)
        problem = ""
        for bucket in range(self.buckets):
            try:
                views, self.sums[bucket] = self._map(bucket, 1)
                problem = first_not_finite(self.by_bucket.get(bucket, []), views)
                if not self.streamed:
                    self.views.update(views)
            except refit_stream.Stalled as err:
                problem = str(err)
            except (RefitRefused, PayloadError) as err:
                problem = str(err)
            except _READ_ERRORS as err:
                problem = _unreadable(err)
            views = None  # dropped before the trainer hears it may remove the bucket
            if self.streamed:
                self.settle(problem, bucket)
            elif problem:
                break
        if not self.streamed:
            self.settle(problem)

    def copy_pass(self, params: Dict[str, torch.Tensor]) -> str:
        """Pass 2: the copies, bucket by bucket. Never raises (it runs inside sglang's weight loader): "" when
        every bucket was copied, else one line -- "refit refused ..." when none was, "refit incomplete ..." when
        some were (the ranks agree before each bucket, so all of them hold the same buckets)."""
        if not self.streamed:
            _copy(params, [c for b in range(self.buckets) for c in self.by_bucket.get(b, [])], self.views)
            finish_reading(list(self.views.values()))  # CUDA IPC: the trainer may change its tensors once answered
            self.views = {}
            return ""
        failed = ""  # this rank's copy of the bucket before failed
        for bucket in range(self.buckets + 1):
            problem, views = failed, {}
            if bucket < self.buckets and not problem:
                try:
                    views, checksum = self._map(bucket, 2)
                    if checksum != self.sums[bucket]:
                        problem = f"bucket {bucket} changed between the check and the copy"
                except refit_stream.Stalled as err:
                    problem = str(err)
                except (PayloadError, *_READ_ERRORS) as err:
                    problem = _unreadable(err)
            try:  # every rank has its bucket and is done with the one before
                message = self.agree(problem, bucket - 1 if bucket else None, 2)
            except _READ_ERRORS as err:
                message = f"the server ranks could not agree ({_unreadable(err)})"
            if message:
                return message if bucket == 0 else \
                    f"refit incomplete: {bucket} of {self.buckets} buckets copied, then {message[len('refit '):]}"
            if bucket < self.buckets:
                try:
                    _copy(params, self.by_bucket.get(bucket, []), views)
                except _READ_ERRORS as err:
                    failed = f"copying bucket {bucket} failed ({_unreadable(err)})"
            views = None
        return ""



@torch.no_grad()
def _copy(params: Dict[str, torch.Tensor], copies: list, views: Dict[tuple, torch.Tensor]) -> None:
    for name, at, dim, offset, rows, (p, src_at, index), src_offset in copies:
        target = params[name].data if at is None else params[name].data[at]
        view = source_view(views, p, src_at, index)
        if dim is None:
            target.copy_(view)
        else:
            target.narrow(dim, offset, rows).copy_(view.narrow(dim, src_offset, rows))


def refit_model(model, payloads: List[dict], rank: int = 0, size: int = 1, group=None) -> None:
    """``stage_model`` then ``commit``: a whole refit of ``model`` in this process (no sglang), all or nothing;
    ``RefitRefused`` (one line) when refused or incomplete."""
    token = secrets.randbits(62)
    stage_model(model, token, payloads, rank, size, group)
    commit(model, token)
    message, model._sp_core_refit_outcome = getattr(model, "_sp_core_refit_outcome", ""), ""
    if message:
        raise RefitRefused(message)


def load_weights(model, weights, load_checkpoint) -> None:
    """``SPCoreForCausalLM.load_weights``: a commit payload (``REFIT_NAME``) applies the staged refit; any
    other weights go to ``load_checkpoint(model, weights)`` (Hugging Face names, full tensors)."""
    weights = iter(weights)
    first = next(weights, None)
    if first is not None and first[0] == REFIT_NAME:
        commit(model, int(first[1].reshape(-1)[0]))
        return
    load_checkpoint(model, itertools.chain([] if first is None else [first], weights))


def commit(model, token: int) -> None:
    """Pass 2 of the staged refit ``token`` (``stage_model``), from sglang's weight loader: the copies into the
    parameters. Never raises (an exception in a loader ends sglang's scheduler); the outcome ("" or one line) is
    kept for ``outcome``."""
    staged, model._sp_core_refit = getattr(model, "_sp_core_refit", None), None
    if staged is None or staged[0] != token:  # apply() stages first
        import logging

        logging.getLogger(__name__).error("sp_core refit: commit of a refit that was not staged; nothing loaded")
        model._sp_core_refit_outcome = "refit refused: commit of a refit that was not staged; nothing loaded"
        return
    model._sp_core_refit_outcome = staged[1].copy_pass(dict(model.named_parameters()))


def outcome(scheduler) -> None:
    """The ``OUTCOME`` RPC: raises the last commit's failure (one line), if it had one."""
    model = scheduler.tp_worker.model_runner.model
    message, model._sp_core_refit_outcome = getattr(model, "_sp_core_refit_outcome", ""), ""
    if message:
        raise RefitRefused(message)


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
