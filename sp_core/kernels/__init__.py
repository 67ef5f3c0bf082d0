"""The kernels room: which fused kernel this platform has (``lookup``), the Triton kernels (``triton_kernels``:
fused norm / rotary; ``triton_batch_invariant``: the deterministic mode's one-launch GEMM) and the
deterministic mode's batch-invariant GEMMs (``batch_invariant``). Nothing is imported here: the Triton modules
import triton, which only CUDA machines need."""
