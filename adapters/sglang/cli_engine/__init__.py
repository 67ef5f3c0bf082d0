"""Not the adapter itself: the ``sglang`` engine of the ``sp-core`` command (``engine``, entry-point group
``sp_core.engines``; it also starts engines for the tests and local runs), the helper process its engines run
in (``engine_process``), and what runs sglang on a CPU-only machine (``cpu_env``, ``cpu_backend/``). The
plugin and the model classes never import it."""
