"""Stand-in for torchvision.transforms.functional (import-only; see torchvision/__init__.py)."""

from enum import Enum

from .._stub import missing as _missing


class InterpolationMode(Enum):
    """Same members and values as torchvision's (referenced as defaults at import time)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name):
    return _missing(__name__, name)
