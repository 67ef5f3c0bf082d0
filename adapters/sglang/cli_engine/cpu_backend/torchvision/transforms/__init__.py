"""Stand-in for torchvision.transforms (import-only; see torchvision/__init__.py)."""

from . import functional  # noqa: F401
from .functional import InterpolationMode  # noqa: F401
from .._stub import missing as _missing


def __getattr__(name):
    return _missing(__name__, name)
