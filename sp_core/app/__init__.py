"""The ``sp-core`` command, an application of the library (``sp_core.mpu`` / ``layers`` / ``models``): cli (the
command), verify (``sp-core verify``), engines (the engine registry), prompts (read and checked), runtime (the
core on a rank), memory (``sp-core memory``), tiny (the embedded tiny checkpoints), console (the terminal),
errors (one-line errors, exit codes)."""
