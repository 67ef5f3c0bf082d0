"""Import-only stand-in for torchvision (sp_core_sglang.cli_engine.cpu_backend, which explains why).

PyPI's torchvision cannot load against the local CPU torch. sglang imports
``torchvision.transforms`` (``.functional``, ``.v2.functional``) at module load for its multimodal
helpers, and transformers 5.19 decides torchvision is available from ``find_spec`` alone, then
imports ``torchvision.io`` and ``torchvision.transforms.v2`` at module load. Only text models are
served here: every name imports (``InterpolationMode`` is the real enum), nothing else works --
using one raises RuntimeError.
"""

from . import io, transforms  # noqa: F401
from ._stub import missing as _missing

__version__ = "0.0.0+sp-core-cpu-fallback"


def __getattr__(name):
    return _missing(__name__, name)
