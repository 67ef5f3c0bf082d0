"""Pure-torch fallback for sgl-kernel's CPU build (not on PyPI); see ``sp_core_sglang.cli_engine.cpu_backend``.

sglang 0.5.23 does ``from sgl_kernel import ...`` at module load when the device is CPU
(``sglang.srt.utils.is_cpu()``, i.e. ``SGLANG_USE_CPU_ENGINE=1``). Of those names, a plain
prefill + decode with the ``torch_native`` attention backend calls only
``assign_req_to_token_pool_cpu`` (``sglang/srt/mem_cache/allocation.py:46,746``), implemented here
in pure torch. The others are imported by modules that every engine process loads but are used
only by speculative decoding or KV-cache moves; they are import-only and raise if called.

One op is registered under ``torch.ops.sgl_kernel``: ``murmur_hash32_cpu``, which sglang's seeded sampler
calls (``kernels/ops/sampling/murmur_hash.py``; every sampled request in ``--enable-deterministic-inference``
is seeded). Nothing else: sglang probes ``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")``
(``srt/utils/common.py``) to decide on the Intel AMX kernels, and ``_init_cpu_threads_env``
(``srt/distributed/bootstrap.py``) calls ``torch.ops.sgl_kernel.init_cpu_threads_env`` / ``initialize`` only
when that probe is True.
"""

import torch

__version__ = "0.0.0+sp-core-cpu-fallback"

# Imported at module load on CPU, never called for plain prefill + decode (file: sglang/...).
_IMPORT_ONLY = (
    "copy_all_layer_kv_cache_cpu",  # kernels/ops/kvcache/cache_move.py:10
    "assign_draft_cache_locs_contiguous_cpu",  # kernels/ops/speculative/cache_locs.py:28
    "assign_extend_cache_locs_cpu",  # kernels/ops/speculative/cache_locs.py:28
    "fill_accept_out_cache_loc_cpu",  # kernels/ops/speculative/eagle.py:10
    "fill_bonus_tokens_cpu",  # kernels/ops/speculative/eagle.py:10
    "build_tree_kernel_efficient_cpu",  # kernels/ops/speculative/spec_tree.py:40
    "verify_tree_greedy_cpu",  # kernels/ops/speculative/spec_tree.py:43
)


def _import_only(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is import-only in sp-core's CPU fallback (sp_core_sglang.cli_engine.cpu_backend); "
            "speculative decoding / KV-cache moves need sgl-kernel's real CPU build."
        )

    op.__name__ = op.__qualname__ = name
    return op


for _name in _IMPORT_ONLY:
    globals()[_name] = _import_only(_name)
del _name

__all__ = ["assign_req_to_token_pool_cpu", "murmur_hash32_cpu", *_IMPORT_ONLY]


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """In place: for request i, ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` gets the
    next ``end[i] - start[i]`` entries of ``out_cache_loc`` (requests packed back to back).

    Same contract as the Triton kernel ``assign_req_to_token_pool`` in
    ``sglang/srt/mem_cache/allocation.py``; ``pool_len`` is ``req_to_token.shape[1]``.
    """
    assert req_to_token.shape[1] == pool_len
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    pt = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[pt : pt + n].to(req_to_token.dtype)
        pt += n


# -- murmur_hash32_cpu: the Triton kernel of sglang's murmur_hash.py in int64 arithmetic (low 32 bits kept) -----

_MASK = 0xFFFFFFFF


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _rotl32((k * 0xCC9E2D51) & _MASK, 15)
    k = (k * 0x1B873593) & _MASK
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _MASK


def murmur_hash32(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """[n, m] uint32: the hash of (seed[i] as two 32-bit words, positions[i], col_indices[j]), as the kernel."""
    seed = seed.to(torch.int64).reshape(-1, 1)
    h = torch.zeros_like(seed)
    h = _mix(h, seed & _MASK)
    h = _mix(h, (seed >> 32) & _MASK)
    h = _mix(h, positions.to(torch.int64).reshape(-1, 1) & _MASK)
    h = _mix(h, col_indices.to(torch.int64).reshape(1, -1) & _MASK)
    return _fmix32(h ^ 16).to(torch.uint32)


@torch.library.custom_op("sgl_kernel::murmur_hash32_cpu", mutates_args=())
def murmur_hash32_cpu(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    return murmur_hash32(seed, positions, col_indices)


@murmur_hash32_cpu.register_fake
def _(seed, positions, col_indices):
    return seed.new_empty((seed.shape[0], col_indices.shape[0]), dtype=torch.uint32)
