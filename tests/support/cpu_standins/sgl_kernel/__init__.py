"""Test-only stand-in for sgl-kernel's CPU build (not on PyPI); see ../README.md.

Provides only what sglang 0.5.23 calls for a plain prefill + decode on CPU with the
``torch_native`` attention backend. Deliberately registers nothing under
``torch.ops.sgl_kernel``, so sglang's AMX probe (``hasattr(torch.ops.sgl_kernel,
"convert_weight_packed")``) stays False and sglang keeps to its pure-torch paths.
"""

import torch

__version__ = "0.0.0+cpu-standin"

__all__ = ["assign_req_to_token_pool_cpu"]


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
