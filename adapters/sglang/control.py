"""Run-time control of the adapter's sequence parallelism, through sglang's own ``Engine.collective_rpc``.

``set_sequence_parallel(engine, False)`` makes every TP worker's sp_core model run plain TP from the next
batch on; ``True`` turns SP back on (batches still below ``SP_CORE_SP_MIN_TOKENS`` run plain TP). Turning
SP on needs an engine started with ``--enable-layernorm-sp`` (sglang's checks of the flag ran then), so
the switch only narrows what the server was started with. ``sp-core verify`` uses it to serve a model's
SP-off and SP-on rows from one engine; a server operator can use it to A/B SP on live traffic.

sglang's ``collective_rpc(method, **kwargs)`` calls ``Scheduler.<method>(**kwargs)`` in every TP worker.
The scheduler has no method of ours, so the plugin registers an AROUND hook on
``Scheduler.handle_rpc_request`` (sglang's plugin ``HookRegistry``) that answers the adapter's methods
(``RPC_PREFIX``) and passes every other request on unchanged.
"""
from __future__ import annotations

RPC_PREFIX = "sp_core_"
SET_SEQUENCE_PARALLEL = RPC_PREFIX + "set_sequence_parallel"
INVALIDATE_RELEASED_WEIGHTS = RPC_PREFIX + "invalidate_released_weights"  # sp_core_sglang.colocate
HOOK_TARGET = "sglang.srt.managers.scheduler.Scheduler.handle_rpc_request"


def set_sequence_parallel(engine, enabled: bool) -> None:
    """Every worker's SP switch (``engine``: an ``sglang.Engine`` serving sp_core's models, or its handle)."""
    engine.collective_rpc(SET_SEQUENCE_PARALLEL, enabled=bool(enabled))


# -- in each TP worker ---------------------------------------------------------------------------------

def _set_sequence_parallel(scheduler, enabled: bool) -> None:
    model = scheduler.tp_worker.model_runner.model
    if not hasattr(model, "sequence_parallel_enabled"):
        raise ValueError(f"{type(model).__name__} is not an sp_core model (serve with SP_CORE_SGLANG=1)")
    if enabled and not model.sequence_parallel_allowed:
        raise ValueError("the engine was started without --enable-layernorm-sp; SP cannot be turned on")
    model.sequence_parallel_enabled = enabled


def _refit_stage(scheduler, token: int, payloads) -> None:
    from sp_core_sglang import refit

    refit.stage(scheduler, token, payloads)


def _refit_outcome(scheduler) -> None:
    from sp_core_sglang import refit

    refit.outcome(scheduler)


def _invalidate_released_weights(scheduler) -> None:
    from sp_core_sglang import colocate

    colocate.invalidate_released_weights(scheduler)


_HANDLERS = {SET_SEQUENCE_PARALLEL: _set_sequence_parallel, RPC_PREFIX + "refit_stage": _refit_stage,
             RPC_PREFIX + "refit_outcome": _refit_outcome, INVALIDATE_RELEASED_WEIGHTS: _invalidate_released_weights}


def handle_rpc_request(original, scheduler, recv_req):
    """The AROUND hook: the adapter's methods here, sglang's own through ``original``. Like sglang's
    handler, a failure is reported back (``success=False``) and every worker meets at the barrier."""
    handler = _HANDLERS.get(recv_req.method)
    if handler is None:
        return original(scheduler, recv_req)
    from sglang.srt.managers.io_struct import RpcReqOutput

    message = ""
    try:
        handler(scheduler, **(recv_req.parameters or {}))
    except Exception as err:  # noqa: BLE001 - sent back to the caller, as sglang's own handler does
        message = f"{recv_req.method}: {err}"
    scheduler.tp_group.barrier()  # sglang's GroupCoordinator: a barrier on its CPU group, as sglang's handler
    return RpcReqOutput(success=not message, message=message)


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(HOOK_TARGET, handle_rpc_request, HookType.AROUND)
        _registered = True
