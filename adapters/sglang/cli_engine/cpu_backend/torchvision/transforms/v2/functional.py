"""Stand-in for torchvision.transforms.v2.functional (import-only; see torchvision/__init__.py)."""

from ..functional import InterpolationMode  # noqa: F401
from ..._stub import missing as _missing


def __getattr__(name):
    return _missing(__name__, name)
