"""Colocation: a trainer and an sglang engine on the same devices, the engine's memory given up while the trainer
trains, through sglang's own ``release_memory_occupation`` / ``resume_memory_occupation`` (its tags ``weights``,
``kv_cache``, ``cuda_graph``), in the order that keeps a refit safe (docs/refit.md, "Colocation"):

1. ``release(engine)``: every tag released; sglang asserts the engine is idle (no request running or waiting).
2. The trainer trains (the memory is its own now).
3. ``resume_weights(engine)``: the weights' memory is back; its contents are not the old weights (sglang releases,
   it does not offload), so nothing may be served before 4.
4. The refit (``sp_core_megatron.refit.refit``) rewrites every served parameter (it refuses a payload that misses
   one). If it is refused, the engine holds no valid weights: stop, or refit again before serving.
5. ``resume_cache(engine)``: the KV cache and the CUDA graphs back; the engine serves the new weights.

``engine``: an ``sglang.Engine`` started with the adapter, or the handle of one in sp-core's engine host.

Where a release keeps the contents -- sglang's memory saver off, as on CPU (torch_memory_saver is CUDA-only) or on a
GPU engine started without ``enable_memory_saver`` -- ``resume_weights`` overwrites every parameter of every TP
worker with NaN: what a real release leaves (garbage), made visible, so that a refit that misses a byte serves NaN
instead of silently serving the old value.
"""
from __future__ import annotations

import torch

from sp_core_sglang.control import INVALIDATE_RELEASED_WEIGHTS

WEIGHTS, CACHE = ["weights"], ["kv_cache", "cuda_graph"]


def release(engine) -> None:
    engine.release_memory_occupation()  # every tag


def resume_weights(engine) -> None:
    engine.resume_memory_occupation(tags=WEIGHTS)
    engine.collective_rpc(INVALIDATE_RELEASED_WEIGHTS)


def resume_cache(engine) -> None:
    engine.resume_memory_occupation(tags=CACHE)


# -- in each TP worker -----------------------------------------------------------------------------------------

@torch.no_grad()
def invalidate_released_weights(scheduler) -> None:
    """NaN into every floating-point parameter, unless sglang's memory saver really released them."""
    if scheduler.memory_saver_adapter.enabled:
        return
    for param in scheduler.tp_worker.model_runner.model.parameters():
        if param.is_floating_point():
            param.data.fill_(float("nan"))
