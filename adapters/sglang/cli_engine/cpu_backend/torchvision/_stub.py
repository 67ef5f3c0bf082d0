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
                "(sp_core_sglang.cli_engine.cpu_backend); image/video processing needs a torchvision built for "
                "this torch."
            )

    return _Missing
