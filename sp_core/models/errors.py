"""The errors the model code raises, which the ``sp-core`` command turns into one line and an exit code."""


class ModelError(ValueError):
    """Bad model input (checkpoint, architecture, shapes): reported as one line, exit 2 from the CLI."""


class NonFiniteError(ArithmeticError):
    """NaN or inf in log-probabilities, a training loss or exported weights: exit 4 from the CLI."""
