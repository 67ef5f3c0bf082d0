"""Async TP: a layer's g / g-bar fused with its GEMM. ``policy`` chooses a form per call (the context holds
one ``Policy``); each form is a module with ``all_gather_matmul(parallel, a_shard, b)`` and
``matmul_reduce_scatter(parallel, a, b, in_flight)``; ``transport`` moves rows by the copy engines."""
from sp_core.mpu.async_tp.policy import CUDA_ONLY, FORMS, IMPLS, OPS, TABLE, Policy

__all__ = ["CUDA_ONLY", "FORMS", "IMPLS", "OPS", "TABLE", "Policy"]
