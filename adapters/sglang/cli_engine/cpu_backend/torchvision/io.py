"""Stand-in for torchvision.io (import-only; see torchvision/__init__.py)."""

from ._stub import missing as _missing


def __getattr__(name):
    return _missing(__name__, name)
