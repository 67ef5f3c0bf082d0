"""Run the real ``sglang.Engine`` (0.5.23) on a CPU-only machine, for tests and local runs.

The code lives in the adapter (``sp_core_sglang.cli_engine.engine`` / ``sp_core_sglang.cli_engine.cpu_env``), which the
``sp-core logits --engine sglang`` command uses too; this module only re-exports it. The fallbacks for
the binaries PyPI does not ship for a CPU torch are in ``sp_core_sglang.cli_engine.cpu_backend``. Engines run in
the adapter's engine host process, so their shutdown cannot kill this process's other children.

Usage::

    from support.sglang_cpu import start_engine, logprobs_for_prompts
    engine = start_engine(model_dir, tp_size=2)                 # plain sglang
    engine = start_engine(model_dir, tp_size=2, adapter=True)   # through sp_core's model classes
    try:
        rows = logprobs_for_prompts(engine, [[1, 2, 3], [4, 5]], vocab_size)  # [len, vocab] float32 each
    finally:
        engine.shutdown()

``SGLANG_USE_CPU_ENGINE`` is read when sglang is imported, so the first ``import sglang`` in the
process must come after ``apply_cpu_engine_env`` (``start_engine`` does it). The engine starts its
children with the ``spawn`` method, which re-imports ``__main__``: a script that starts an engine needs
an ``if __name__ == "__main__":`` guard (pytest test modules are fine).

First-request cost: at tp > 1 sglang's ``VocabParallelEmbedding`` runs a ``torch.compile``d helper
(``get_masked_input_and_mask``), so the first request after start of plain sglang compiles with
inductor (~5-20 s on 2 cores; cached under ~/.cache/sglang/inductor across runs).
"""
from sp_core_sglang.cli_engine.cpu_env import apply_cpu_engine_env, cpu_engine_env  # noqa: F401
from sp_core_sglang.cli_engine.engine import logprobs_for_prompts, start_engine  # noqa: F401
