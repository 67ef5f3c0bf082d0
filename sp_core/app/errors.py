"""The errors the ``sp-core`` command turns into one line and an exit code (README: errors and exit codes).

ModelError (bad checkpoint / model input, exit 2) and NonFiniteError (NaN or inf, exit 4) live with the model
config, ``sp_core.models``, which raises them too.
"""
from sp_core.models.config import NonFiniteError  # noqa: F401


class UsageError(ValueError):
    """Bad command-line input (a flag's value, a path): exit 2."""


class EngineUnavailable(RuntimeError):
    """An engine or framework that was asked for cannot run here (not installed, no CPU path): exit 3."""

