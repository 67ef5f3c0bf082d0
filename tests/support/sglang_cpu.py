"""Run the real ``sglang.Engine`` (0.5.23) on a CPU-only machine, for tests and local runs.

sglang's CPU path needs two binaries PyPI does not ship for a CPU torch (sgl-kernel's CPU build and a
torchvision that loads); ``cpu_standins/`` holds import-only stand-ins for them (see its README). The
engine spawns a scheduler process per TP rank and a detokenizer process, so everything here goes
through environment variables those children inherit (``PYTHONPATH`` for the stand-ins).

Usage::

    from support.sglang_cpu import start_engine, logprobs_for_prompts
    engine = start_engine(model_dir, tp_size=2)          # set env, import sglang, start
    try:
        rows = logprobs_for_prompts(engine, [[1, 2, 3], [4, 5]])   # [len, vocab] float32 each
    finally:
        engine.shutdown()

``SGLANG_USE_CPU_ENGINE`` is read when sglang is imported, so the first ``import sglang`` in the
process must come after ``cpu_engine_env`` has been applied (``start_engine`` does it; it refuses to
run if sglang was already imported without it). The engine starts its children with the ``spawn``
method, which re-imports ``__main__``: a script that starts an engine needs an
``if __name__ == "__main__":`` guard (pytest test modules are fine).

First-request cost: at tp > 1 sglang's ``VocabParallelEmbedding`` runs a ``torch.compile``d helper
(``get_masked_input_and_mask``), so the first request after start compiles with inductor
(~5-20 s on 2 cores; cached under ~/.cache/sglang/inductor across runs).
"""

from __future__ import annotations

import os
import sys
from typing import Any

STANDINS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_standins")


def _cpu_groups(tp_size: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND value: one '|'-separated CPU list per rank.

    Without an AMX-capable sgl-kernel, sglang does not bind threads itself
    (``srt/distributed/bootstrap.py::_init_cpu_threads_env``); the value only has to have one
    entry per rank (``srt/utils/numa_utils.py::init_threads_binding``). Cores are split
    contiguously; with more ranks than cores, ranks share cores round-robin.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1)
    )
    if tp_size <= len(cpus):
        per = len(cpus) // tp_size
        groups = [cpus[i * per : (i + 1) * per] for i in range(tp_size)]
    else:
        groups = [[cpus[i % len(cpus)]] for i in range(tp_size)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def cpu_engine_env(tp_size: int) -> dict[str, str]:
    """Environment variables for a CPU ``sglang.Engine`` with ``tp_size`` ranks.

    - ``SGLANG_USE_CPU_ENGINE=1``: selects sglang's CPU platform (read at import).
    - ``SGLANG_CPU_OMP_THREADS_BIND``: needed once ranks outnumber NUMA nodes (1 here).
    - ``PYTHONPATH``: the stand-ins directory prepended, so the spawned scheduler/detokenizer
      processes import them too.
    - ``OMP_NUM_THREADS``: cores / ranks (unless already set), to avoid oversubscription; sglang
      does not pin threads on CPU without the AMX kernels.
    """
    existing = os.environ.get("PYTHONPATH", "")
    parts = [p for p in existing.split(os.pathsep) if p and p != STANDINS_DIR]
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "SGLANG_USE_CPU_ENGINE": "1",
        "SGLANG_CPU_OMP_THREADS_BIND": _cpu_groups(tp_size),
        "PYTHONPATH": os.pathsep.join([STANDINS_DIR, *parts]),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, ncpu // tp_size)),
    }


def apply_cpu_engine_env(tp_size: int) -> None:
    """Apply ``cpu_engine_env`` to this process (env + sys.path). Call before importing sglang."""
    if "sglang" in sys.modules and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        raise RuntimeError(
            "sglang was imported before SGLANG_USE_CPU_ENGINE=1 was set; its CPU detection is "
            "already cached. Apply cpu_engine_env() before the first `import sglang`."
        )
    os.environ.update(cpu_engine_env(tp_size))
    if STANDINS_DIR not in sys.path:
        sys.path.insert(0, STANDINS_DIR)


def start_engine(model_dir: str, tp_size: int = 1, **extra_engine_kwargs: Any):
    """Start and return a real ``sglang.Engine`` on CPU (float32, torch_native attention).

    ``extra_engine_kwargs`` override the defaults below (any ``ServerArgs`` field, e.g.
    ``enable_layernorm_sp=True``, ``disable_radix_cache=True``, ``log_level="info"``).
    Call ``engine.shutdown()`` when done (or use it as a context manager).
    """
    apply_cpu_engine_env(tp_size)
    import sglang

    kwargs: dict[str, Any] = dict(
        model_path=model_dir,
        device="cpu",
        attention_backend="torch_native",
        dtype="float32",
        tp_size=tp_size,
        skip_tokenizer_init=True,
        disable_cuda_graph=True,
        grammar_backend="none",
        # With SGLANG_CPU_OMP_THREADS_BIND set sglang does not know per-rank memory
        # (srt/utils/common.py::get_cpu_memory_capacity warns to set --max-total-tokens);
        # bound the KV pool explicitly (plenty for tiny test models).
        max_total_tokens=4096,
        log_level="error",
    )
    kwargs.update(extra_engine_kwargs)
    return sglang.Engine(**kwargs)


def logprobs_for_prompts(engine, prompts: list[list[int]], vocab_size: int | None = None):
    """Full-vocabulary log-probs at every position of each prompt: a list of float32 ``[len, vocab]``.

    Row ``j`` is log p(. | prompt[: j + 1]) (row ``len-1`` is the next-token distribution).

    API used: ``engine.generate(input_ids=prompts, sampling_params={"temperature": 0,
    "max_new_tokens": 1}, return_logprob=True, logprob_start_len=0, top_logprobs_num=vocab)``.
    ``meta_info["input_top_logprobs"]`` has one entry per prompt token; entry 0 is None (nothing
    predicts the first token) and entry ``j >= 1`` is the distribution at position ``j - 1``; the
    last position's distribution is ``meta_info["output_top_logprobs"][0]``. Each entry is a list of
    ``(logprob, token_id, text)`` with all ``vocab`` tokens when ``top_logprobs_num == vocab``. With
    temperature 0 the sampler returns the plain ``log_softmax`` of the logits
    (``srt/layers/sampler.py``). ``vocab_size`` defaults to the model's ``vocab_size``; the padded
    part of a vocab (if any) is not returned by sglang. (``token_ids_logprob=list(range(vocab))``
    gives identical numbers via ``input_token_ids_logprobs`` / ``output_token_ids_logprobs``.)
    """
    import torch

    if vocab_size is None:
        vocab_size = _model_vocab_size(engine)
    outs = engine.generate(
        input_ids=[list(map(int, p)) for p in prompts],
        sampling_params={"temperature": 0.0, "max_new_tokens": 1},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=vocab_size,
    )
    if isinstance(outs, dict):  # sglang returns a bare dict for a single prompt
        outs = [outs]
    result = []
    for prompt, out in zip(prompts, outs):
        meta = out["meta_info"]
        entries = list(meta["input_top_logprobs"][1:]) + [meta["output_top_logprobs"][0]]
        assert len(entries) == len(prompt), (len(entries), len(prompt))
        rows = torch.full((len(prompt), vocab_size), float("nan"), dtype=torch.float32)
        for j, entry in enumerate(entries):
            for item in entry:
                rows[j, int(item[1])] = float(item[0])
        assert not torch.isnan(rows).any(), "sglang returned fewer than vocab_size logprobs"
        result.append(rows)
    return result


def _model_vocab_size(engine) -> int:
    import json

    with open(os.path.join(engine.server_args.model_path, "config.json")) as f:
        cfg = json.load(f)
    return int(cfg.get("vocab_size") or cfg["text_config"]["vocab_size"])
