"""Shared helper of the torchvision stand-in: names that import but cannot be used."""


def missing(module: str, name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    class _Missing:
        __qualname__ = __name__ = name
        __module__ = module

        def __init__(self, *args, **kwargs):
            raise RuntimeError(
                f"{module}.{name} is part of the import-only torchvision stand-in "
                "(tests/support/cpu_standins); image/video processing is unavailable on this CPU setup."
            )

    return _Missing
