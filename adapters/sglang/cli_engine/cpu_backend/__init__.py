"""sglang's CPU backend where PyPI lacks it: pure-torch fallbacks for two binaries.

The real ``sglang.Engine`` (0.5.23) runs on a CPU-only machine (``SGLANG_USE_CPU_ENGINE=1``), but two
of the binaries it imports are not on PyPI for a CPU torch. This directory holds a fallback package for
each; ``cpu_env`` puts the directory on ``sys.path`` / ``PYTHONPATH`` of the processes that run sglang
(the engine host and its scheduler / detokenizer workers) only when the real package is missing
(``missing()``), and never on a GPU. It is not a package to import: its subdirectories are.

- ``sgl_kernel/``: sgl-kernel's CPU build (PyPI's wheel is CUDA-only). On CPU, sglang does
  ``from sgl_kernel import <name>`` at module load for 8 names. A prefill + decode with the
  ``torch_native`` attention backend (radix cache, chunked prefill and mixed batches included) calls
  one of them, ``assign_req_to_token_pool_cpu``, implemented here in pure torch; the other 7
  (speculative decoding, KV-cache moves) import but raise ``NotImplementedError`` when called.
  Nothing is registered under ``torch.ops.sgl_kernel``, so sglang's AMX probe
  (``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")``) stays False and sglang keeps to its
  pure-torch paths (no AMX kernels, no shared-memory all-reduce: collectives use gloo).
- ``torchvision/``: PyPI's torchvision cannot load against a CPU torch built elsewhere (``operator
  torchvision::nms does not exist``), and sglang imports ``torchvision.transforms`` at module load for
  its multimodal helpers. Every name imports (``InterpolationMode`` is the real enum); using anything
  raises ``RuntimeError``. Text models only.
"""
from __future__ import annotations

import importlib.util
import os
from typing import List

DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ("sgl_kernel", "torchvision")


def provides(package: str) -> bool:
    """True when ``package`` would be imported from this directory (or is not importable at all)."""
    spec = importlib.util.find_spec(package)
    return spec is None or os.path.dirname(os.path.dirname(spec.origin or "")) == DIR


def missing() -> List[str]:
    """The packages that sglang needs on CPU and this environment lacks (the fallbacks then serve)."""
    return [p for p in PACKAGES if provides(p)]
