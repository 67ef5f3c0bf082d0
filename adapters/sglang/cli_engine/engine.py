"""The ``sglang`` engine of `sp-core logits` / `sp-core verify`: a real ``sglang.Engine`` (its own
scheduler process per TP rank) serving the checkpoint through this adapter; prompt log-probabilities.

Also the one place that starts engines for tests and local runs (``start_engine``): with
``adapter=False`` it starts plain sglang, as if sp-core were not installed. Engines run in the engine
host process (``engine_process``), never in the caller's.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import logging
import os
import shutil
from typing import Any, Dict, Iterator, List, Optional

import torch

from sp_core.app.engines import EngineUnavailable, check_model
from sp_core.app.prompts import check_prompts
from sp_core.models import ModelError
from sp_core.models.checkpoint import check_finite_weights
from sp_core.mpu import platform
from sp_core_sglang import control, plugin
from sp_core_sglang.cli_engine import cpu_backend, cpu_env, engine_process
from sp_core_sglang.models.causal_lm import SP_MIN_TOKENS_ENV

ENGINE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def max_default_tp() -> Optional[int]:
    """On CPU, sglang binds each rank's threads to its own cores: the default verify matrix stays within
    the cores (an explicit --tp still runs, oversubscribed)."""
    return len(cpu_env._cpus()) if platform.device_type() == "cpu" else None


def check_available() -> None:
    if importlib.util.find_spec("sglang") is None:
        raise EngineUnavailable("sglang is not installed (pip install 'sp-core[sglang]')")
    if platform.device_type() == "cpu" and not os.path.isdir(cpu_backend.DIR):
        raise EngineUnavailable(f"sglang on CPU needs sgl-kernel's CPU build or sp-core's fallback for it, and "
                                f"{cpu_backend.DIR} is missing; reinstall sp-core")


def warm_up() -> None:
    """Start what an engine start needs, in the background (``sp-core verify`` calls it before its first
    rows, so that sglang's imports overlap them): the engine host (``engine_process.warm_up``)."""
    check_available()
    engine_process.warm_up()


@contextlib.contextmanager
def _adapter_env(adapter: bool, sp_min_tokens: Optional[int]) -> Iterator[None]:
    """The adapter's switches for the engine's worker processes, which inherit them when spawned."""
    if adapter:
        updates: Dict[str, Optional[str]] = dict(plugin.ENGINE_ENV)
    else:
        updates = {key: None for key, value in plugin.ENGINE_ENV.items() if os.environ.get(key) == value}
    if sp_min_tokens is not None:
        updates[SP_MIN_TOKENS_ENV] = str(sp_min_tokens)
    before = {k: os.environ.get(k) for k in updates}
    try:
        _set_env(updates)
        yield
    finally:
        _set_env(before)


def _set_env(values: Dict[str, Optional[str]]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def start_engine(model_dir: str, tp_size: int = 1, *, adapter: bool = False, sp_min_tokens: Optional[int] = None,
                 **engine_kwargs: Any) -> engine_process.RemoteEngine:
    """Start a ``sglang.Engine`` in the engine host; returns a handle with sglang's ``generate(**kwargs)``
    and ``shutdown()`` (call it when done). Arguments as for ``start_engine_here``."""
    return engine_process.start(start_engine_here, model_dir, tp_size, adapter=adapter, sp_min_tokens=sp_min_tokens,
                                **engine_kwargs)


def start_engine_here(model_dir: str, tp_size: int = 1, *, adapter: bool = False, sp_min_tokens: Optional[int] = None,
                      **engine_kwargs: Any):
    """Start and return a ``sglang.Engine`` in this process (its ``shutdown()`` kills this process's
    children: use ``start_engine`` unless this is a process of its own).

    ``adapter``: serve through sp_core's model classes (SP_CORE_SGLANG=1 in the workers) or plain sglang.
    ``sp_min_tokens``: SP_CORE_SP_MIN_TOKENS for the workers. ``engine_kwargs``: any ``ServerArgs``
    field (e.g. ``enable_layernorm_sp=True``), overriding the defaults. On CPU: float32, the
    ``torch_native`` attention backend, no CUDA graphs; a script that starts an engine needs an
    ``if __name__ == "__main__":`` guard (sglang spawns its workers). sglang loads plugins once per
    process, so ``adapter=True`` enables the adapter here directly; a later ``adapter=False`` engine's
    workers run plain sglang, while this process keeps the extended layernorm-SP allowlist.
    """
    on_cpu = platform.device_type() == "cpu"
    if on_cpu:
        cpu_env.apply_cpu_engine_env(tp_size)
    log_level = engine_kwargs.setdefault("log_level", "error")
    logging.getLogger("sglang").setLevel(log_level.upper())  # its import-time warnings come before the engine's
    try:
        import sglang
    except ImportError as err:
        raise EngineUnavailable(f"sglang does not import here ({err})") from None
    if adapter:
        plugin.enable()
    kwargs: Dict[str, Any] = dict(model_path=model_dir, tp_size=tp_size, skip_tokenizer_init=True,
                                  grammar_backend="none")
    if on_cpu:
        # sglang cannot size the KV pool per rank on CPU (srt/utils/common.py::get_cpu_memory_capacity)
        kwargs.update(device="cpu", attention_backend="torch_native", dtype="float32", disable_cuda_graph=True,
                      max_total_tokens=4096)
    kwargs.update(engine_kwargs)
    engine_cls = sglang.Engine
    if on_cpu:  # workers forked from a fork server that has imported sglang, not spawned (forking)
        from sp_core_sglang.cli_engine import forking

        engine_cls = forking.engine_class()
    with _adapter_env(adapter, sp_min_tokens):
        return engine_cls(**kwargs)


def start_for_refit(model_dir: str, tp: int, sequence_parallel: bool, moe_parallel: str = "tp",
                    deterministic: bool = False, **engine_kwargs) -> engine_process.RemoteEngine:
    """An engine that a trainer refits in memory (``sp_core_sglang.refit``): the adapter, SP for every prefill
    when ``sequence_parallel`` (min tokens 0), the MoE mode as sglang's ``--ep-size``, sglang's deterministic
    inference when asked; the radix cache on (each refit flushes it). Its handle pickles to the trainer's ranks."""
    check_available()
    kwargs = dict(enable_layernorm_sp=tp > 1 and sequence_parallel, enable_deterministic_inference=deterministic,
                  **({"ep_size": tp} if moe_parallel == "ep" and tp > 1 else {}))
    kwargs.update(engine_kwargs)
    try:
        return start_engine(model_dir, tp, adapter=True, sp_min_tokens=0, **kwargs)
    except ValueError as err:  # sglang's own validation of the server arguments
        raise ModelError(f"sglang rejected the configuration: {str(err).splitlines()[0]}") from None


def logprobs_for_prompts(engine, prompts: List[List[int]], vocab_size: int) -> List[torch.Tensor]:
    """Full-vocabulary log-probs at every position of each prompt: float32 ``[len, vocab]`` each.

    ``meta_info["input_top_logprobs"]`` has one entry per prompt token; entry 0 is None (nothing
    predicts the first token) and entry ``j >= 1`` is the distribution at position ``j - 1``; the last
    position's is ``meta_info["output_top_logprobs"][0]``. Entries are ``(logprob, token_id, text)``
    lists; with ``top_logprobs_num == vocab`` they cover the vocabulary. With temperature 0 the
    sampler returns the plain ``log_softmax`` of the logits (``srt/layers/sampler.py``).
    """
    outs = engine.generate(input_ids=[list(map(int, p)) for p in prompts],
                           sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                           return_logprob=True, logprob_start_len=0, top_logprobs_num=vocab_size)
    if isinstance(outs, dict):  # a bare dict for a single prompt
        outs = [outs]
    result = []
    for prompt, out in zip(prompts, outs):
        meta = out["meta_info"]
        entries = list(meta["input_top_logprobs"][1:]) + [meta["output_top_logprobs"][0]]
        rows = torch.full((len(prompt), vocab_size), float("nan"), dtype=torch.float32)
        for j, entry in enumerate(entries):
            for logprob, token_id, _ in entry:
                rows[j, int(token_id)] = float(logprob)
        if torch.isnan(rows).any():
            raise RuntimeError("sglang returned fewer log-probabilities than the vocabulary size")
        result.append(rows)
    return result


class _Served:
    """One engine of ``logprobs`` and the collective log its workers append to (SP_CORE_COLLECTIVE_LOG):
    the evidence of which collectives each request issued."""

    def __init__(self, key, engine, log_dir: str, sequence_parallel_allowed: bool):
        self.key, self.engine, self.log_dir = key, engine, log_dir
        self.sequence_parallel_allowed = sequence_parallel_allowed

    @property
    def log_path(self) -> str:
        return os.path.join(self.log_dir, "collectives.log")

    def collectives(self) -> Dict[int, collections.Counter]:
        """worker pid -> Counter of collective ops logged since the last call (the log is cleared)."""
        if not os.path.exists(self.log_path):
            return {}
        with open(self.log_path) as f:
            lines = f.read().split()
        os.remove(self.log_path)
        per_pid: Dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for pid, op in zip(lines[0::4], lines[1::4]):
            per_pid[int(pid)][op] += 1
        return per_pid

    def shutdown(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            shutil.rmtree(self.log_dir, ignore_errors=True)


_KEPT: Optional[_Served] = None  # inside ``reusing()``: the engine kept for the next call
_REUSING = False


@contextlib.contextmanager
def reusing() -> Iterator[None]:
    """Inside, ``logprobs`` keeps its engine for the next call with the same checkpoint, tp, dtype, MoE mode
    and deterministic mode: an engine start costs far more than the requests (tens of seconds on a CPU),
    and one engine started with ``--enable-layernorm-sp`` serves both SP settings, switched per call
    (``control.set_sequence_parallel``). ``sp-core verify`` runs its rows inside it."""
    global _REUSING
    _REUSING = True
    try:
        yield
    finally:
        _REUSING = False
        _release()


def _release() -> None:
    global _KEPT
    if _KEPT is not None:
        kept, _KEPT = _KEPT, None
        kept.shutdown()


def _serve(key, model_dir: str, tp: int, sequence_parallel: bool, dtype: torch.dtype, moe_parallel: str,
           deterministic: bool, pool: int) -> _Served:
    # SP at tp 1 is a no-op in sp_core; sglang would reject the flag. Reusing: started with SP allowed, so
    # that the same engine serves SP off and on. Min tokens 0: tiny prompts run SP too.
    allow_sp = tp > 1 and (sequence_parallel or _REUSING)
    log_dir = engine_process.scratch_dir()  # removed however this process ends (kill -9 included)
    try:
        with _collective_log(os.path.join(log_dir, "collectives.log")):
            engine = start_engine(model_dir, tp, adapter=True, sp_min_tokens=0, dtype=ENGINE_DTYPES[dtype],
                                  enable_layernorm_sp=allow_sp, disable_radix_cache=True,
                                  **({"ep_size": tp} if moe_parallel == "ep" and tp > 1 else {}),
                                  enable_deterministic_inference=deterministic,
                                  **({"max_total_tokens": pool} if platform.device_type() == "cpu" else {}))
    except ValueError as err:  # sglang's own validation of the server arguments
        shutil.rmtree(log_dir, ignore_errors=True)
        raise ModelError(f"sglang rejected the configuration: {str(err).splitlines()[0]}") from None
    except BaseException:
        shutil.rmtree(log_dir, ignore_errors=True)
        raise
    return _Served(key, engine, log_dir, allow_sp)


@contextlib.contextmanager
def _collective_log(path: str) -> Iterator[None]:
    """SP_CORE_COLLECTIVE_LOG for the workers about to be spawned (they inherit the environment)."""
    before = os.environ.get("SP_CORE_COLLECTIVE_LOG")
    os.environ["SP_CORE_COLLECTIVE_LOG"] = path
    try:
        yield
    finally:
        _set_env({"SP_CORE_COLLECTIVE_LOG": before})


def check_sequence_parallel_ran(collectives: Dict[int, collections.Counter], tp: int, sequence_parallel: bool) -> None:
    """The evidence that a request ran with SP as asked: with SP every one of the ``tp`` workers issued
    reduce-scatters (SP's g-bar, which plain TP never issues); without SP none did."""
    if tp == 1:
        return
    scattered = [pid for pid, ops in collectives.items() if ops["reduce_scatter"]]
    if sequence_parallel and len(scattered) != tp:
        raise RuntimeError(f"SP was asked for, but {len(scattered)} of {tp} sglang workers reduce-scattered "
                           f"({_ops_text(collectives)}): the adapter's SP did not run")
    if not sequence_parallel and scattered:
        raise RuntimeError(f"SP off was asked for, but sglang workers reduce-scattered ({_ops_text(collectives)})")


def _ops_text(collectives: Dict[int, collections.Counter]) -> str:
    return "; ".join(f"pid {pid}: {dict(ops)}" for pid, ops in collectives.items()) or "no collectives"


def logprobs(model_dir: str, prompts, tp: int, sequence_parallel: bool, dtype: torch.dtype,
             moe_parallel: str = "tp", deterministic: bool = False) -> List[torch.Tensor]:
    """``moe_parallel`` "ep": sglang's ``--ep-size tp`` (the adapter's MoE then runs expert parallelism).
    ``deterministic``: sglang's ``--enable-deterministic-inference`` (the core's deterministic mode).
    At tp > 1 the workers' collectives are checked: SP ran exactly where asked (``check_sequence_parallel_ran``)."""
    global _KEPT
    cfg = check_model(model_dir, tp, moe_parallel)  # the core's checkpoint check, before sglang's workers can fail on it
    if _KEPT is None or _KEPT.key[0] != os.path.realpath(model_dir):  # a kept engine's weights were checked
        check_finite_weights(model_dir)  # sglang's workers would refuse it only inside an engine start (exit 1)
    check_prompts(prompts, cfg.vocab_size)
    cfg.check_prompt_lengths(prompts)
    if dtype not in ENGINE_DTYPES:
        raise ModelError(f"dtype {dtype} is not supported by the sglang engine; use float32 or bfloat16")
    check_available()
    # the KV pool holds every prompt plus its one generated token at once (radix cache off)
    pool = sum(len(p) + 1 for p in prompts) + 64
    key = (os.path.realpath(model_dir), tp, dtype, moe_parallel, deterministic, pool)
    if _KEPT is not None and _KEPT.key != key:
        _release()
    served = _KEPT if _KEPT is not None else _serve(key, model_dir, tp, sequence_parallel, dtype, moe_parallel,
                                                   deterministic, pool)
    keep = False
    try:
        if served.sequence_parallel_allowed:
            control.set_sequence_parallel(served.engine, sequence_parallel)
        served.collectives()  # clear
        result = logprobs_for_prompts(served.engine, prompts, cfg.vocab_size)
        check_sequence_parallel_ran(served.collectives(), tp, sequence_parallel)
        keep = _REUSING
        return result
    finally:
        if keep:
            _KEPT = served
        else:
            _KEPT = None
            served.shutdown()
