"""A server rank's two passes of a refit (``sp_core_sglang.refit`` describes the protocol): ``stage_model`` plans
this rank's copies, reads and checks every value and agrees with the other ranks; ``commit`` makes the copies.
They run in a TP worker of sglang (the adapter's RPC and weight loader) or, as ``refit_model``, in any process
without sglang."""
from __future__ import annotations

import secrets
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

_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError)


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
    raise_commit_failure(model)


def commit(model, token: int) -> None:
    """Pass 2 of the staged refit ``token`` (``stage_model``), from sglang's weight loader: the copies into the
    parameters. Never raises (an exception in a loader ends sglang's scheduler); the outcome ("" or one line) is
    kept for ``raise_commit_failure``."""
    staged, model._sp_core_refit = getattr(model, "_sp_core_refit", None), None
    if staged is None or staged[0] != token:  # sp_core_sglang.refit.apply stages first
        import logging

        logging.getLogger(__name__).error("sp_core refit: commit of a refit that was not staged; nothing loaded")
        model._sp_core_refit_outcome = "refit refused: commit of a refit that was not staged; nothing loaded"
        return
    model._sp_core_refit_outcome = staged[1].copy_pass(dict(model.named_parameters()))


def raise_commit_failure(model) -> None:
    """Raises the last ``commit``'s failure (``RefitRefused``, one line), if it had one; forgets it either way."""
    message, model._sp_core_refit_outcome = getattr(model, "_sp_core_refit_outcome", ""), ""
    if message:
        raise RefitRefused(message)
