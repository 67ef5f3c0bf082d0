"""Bind Megatron's tensor-parallel group into sp_core.mpu (creates nothing); Megatron's parameter device."""
from __future__ import annotations

from megatron.core import parallel_state

import torch

from sp_core import mpu
from sp_core.models import ModelError
from sp_core.mpu import platform


def parameter_device(config) -> torch.device:
    """Where Megatron puts parameters: the current accelerator, or the CPU with use_cpu_initialization."""
    return torch.device("cpu") if getattr(config, "use_cpu_initialization", False) else platform.current_device()


def bind_tensor_parallel_group(config) -> mpu.ParallelContext:
    """The core's context on Megatron's TP group (and its CP group under context parallelism), with the config's
    SP and ``deterministic_mode``."""
    if not parallel_state.model_parallel_is_initialized():
        raise ModelError("megatron.core.parallel_state is not initialised: call "
                         "parallel_state.initialize_model_parallel(...) before building the model")
    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    if size != config.tensor_model_parallel_size:
        raise ModelError(f"config.tensor_model_parallel_size={config.tensor_model_parallel_size} but Megatron's "
                         f"tensor-parallel group has {size} ranks")
    if (getattr(config, "expert_model_parallel_size", 1) or 1) > 1:
        # the core's expert parallelism all-to-alls over the TP group: Megatron's expert-parallel group (over
        # which its DDP and optimizer treat expert gradients) must be that same group, as Megatron's default
        # rank order makes it when expert_model_parallel_size = tp and expert_tensor_parallel_size = 1
        ep_rank, ep_size = parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size()
        if (ep_rank, ep_size) != (parallel_state.get_tensor_model_parallel_rank(), size):
            raise ModelError(f"Megatron's expert-parallel group (rank {ep_rank} of {ep_size}) is not the tensor-parallel "
                             f"group (rank {parallel_state.get_tensor_model_parallel_rank()} of {size}); sp-core's "
                             f"expert parallelism needs expert_model_parallel_size = tensor_model_parallel_size, "
                             f"expert_tensor_parallel_size = 1 and Megatron's default rank order")
    cp = parallel_state.get_context_parallel_world_size()
    if cp != (getattr(config, "context_parallel_size", 1) or 1):
        raise ModelError(f"config.context_parallel_size={config.context_parallel_size} but Megatron's "
                         f"context-parallel group has {cp} ranks")
    return mpu.bind(group, sequence_parallel=config.sequence_parallel,
                    deterministic=getattr(config, "deterministic_mode", False),  # Megatron's own switch
                    cp_group=parallel_state.get_context_parallel_group() if cp > 1 else None)
