"""Model-parallel utilities: the parallel context, collectives and the paper's operators."""
from sp_core.mpu import platform
from sp_core.mpu.door import counting as counting_collectives
from sp_core.mpu.context import (
    ParallelContext,
    ParallelStateError,
    bind,
    building,
    context_for,
    default_context,
    destroy,
    initialize,
    is_initialized,
    single_rank,
)
from sp_core.mpu.grads import allreduce_context_parallel_grads, allreduce_sequence_parallel_grads
from sp_core.mpu.operators import (
    all_to_all_tp,
    copy_to_replicas,
    copy_to_tp,
    enter_sequence_parallel,
    exit_sequence_parallel,
    gather_from_cp,
    gather_from_cp_exit,
    gather_from_sp,
    gather_from_sp_packed,
    gather_to_replicated,
    pad_1d,
    pad_to_multiple,
    padded_length,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
)
