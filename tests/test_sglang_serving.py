"""The adapter on the paths sglang serving uses by default, in the real sglang.Engine (CPU, float32, tp 2,
--enable-layernorm-sp, SP_CORE_SP_MIN_TOKENS=0 so that every plain prefill runs SP): the radix cache on,
chunked prefill in chunks smaller than the prompts, mixed chunked-prefill + decode batches
(--enable-mixed-chunk), 8 concurrent requests of mixed lengths. One engine start serves every check;
each compares with transformers (log-probabilities within 1e-4, greedy tokens equal).

Also: the SP switch by forward mode, and that an engine's shutdown leaves the launcher's helper
processes (fork server, resource tracker) alive.
"""
import collections
import importlib.util
import json
import os

import pytest
import torch

from sp_core.app.tiny import make_checkpoint
from support.multirank import run_ranks
from support.serving import distributions, generate, hf_greedy, hf_logprobs, read_collectives

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed"),
    pytest.mark.timeout(600),
]

CHUNK = 16
NEW_TOKENS = 16
PREFIX = [int(t) for t in torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(7))]  # 3 chunks
SUFFIX = [5, 17, 3, 88, 41, 9]
# 8 requests at once, 1 to 40 tokens: several prefill rounds, so later prefills meet earlier decodes
CONCURRENT = [[int(t) for t in torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n))]
              for n in (5, 1, 40, 3, 23, 2, 17, 9)]


class Served:
    def __init__(self, engine, model_dir, log_path):
        self.engine, self.model_dir, self.log_path = engine, model_dir, log_path
        with open(os.path.join(model_dir, "config.json")) as f:
            self.vocab = json.load(f)["vocab_size"]

    def collectives(self):
        """Counter of (pid, op, rows) logged by the workers since the last call (the log is cleared)."""
        return collections.Counter((pid, op, int(shape.strip("()").split(",")[0]))
                                   for pid, op, shape, _ in read_collectives(self.log_path))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from sp_core_sglang.cli_engine.engine import start_engine

    root = tmp_path_factory.mktemp("serving")
    model_dir = make_checkpoint("qwen3", str(root / "qwen3"))
    log_path = str(root / "collectives.log")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SP_CORE_COLLECTIVE_LOG", log_path)  # the workers inherit it at start
        engine = start_engine(model_dir, 2, adapter=True, sp_min_tokens=0, enable_layernorm_sp=True,
                              chunked_prefill_size=CHUNK, enable_mixed_chunk=True)  # radix cache on (default)
    try:
        yield Served(engine, model_dir, log_path)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def hf_model(served):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(served.model_dir, dtype=torch.float32).eval()


def test_chunked_prefill_then_radix_cache_hit_equal_transformers(served, hf_model):
    served.collectives()
    # 40 tokens in chunks of 16: three extends, the 2nd and 3rd over the cached earlier chunks
    first = generate(served.engine, [PREFIX], sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                      return_logprob=True, logprob_start_len=0, top_logprobs_num=served.vocab)[0]
    diff = (distributions(first["meta_info"], served.vocab) - hf_logprobs(hf_model, PREFIX)).abs().max().item()
    sp_rows = [rows for (_, op, rows) in served.collectives() if op == "reduce_scatter"]
    print(f"chunked prefill: max |d logprob| vs transformers {diff:.2e}; SP rows per forward {sorted(set(sp_rows))}")
    assert diff <= 1e-4
    assert max(sp_rows) == CHUNK, "the prompt should prefill in chunks of CHUNK tokens, each under SP"

    # the prefix is now in the radix cache: the second request extends only its suffix
    prompt = PREFIX + SUFFIX
    second = generate(served.engine, [prompt], sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                       return_logprob=True, logprob_start_len=len(PREFIX), top_logprobs_num=served.vocab)[0]
    meta = second["meta_info"]
    assert meta["cached_tokens"] == len(PREFIX), meta["cached_tokens"]
    got = distributions(meta, served.vocab)  # positions len(PREFIX) .. len(prompt) - 1
    want = hf_logprobs(hf_model, prompt)[len(PREFIX):]
    diff = (got - want).abs().max().item()
    sp_rows = [rows for (_, op, rows) in served.collectives() if op == "reduce_scatter"]
    print(f"radix cache hit of {meta['cached_tokens']} tokens: max |d logprob| vs transformers {diff:.2e}")
    assert diff <= 1e-4
    assert set(sp_rows) == {len(SUFFIX)}, "only the suffix is computed, under SP"


def test_concurrent_mixed_lengths_greedy_equal_transformers(served, hf_model):
    served.collectives()
    outs = generate(served.engine, CONCURRENT, sampling_params={"temperature": 0.0, "max_new_tokens": NEW_TOKENS,
                                                          "ignore_eos": True})
    want = hf_greedy(hf_model, CONCURRENT, NEW_TOKENS)
    for i, (out, tokens) in enumerate(zip(outs, want)):
        assert out["output_ids"] == tokens, f"prompt {i} ({len(CONCURRENT[i])} tokens): {out['output_ids']} vs {tokens}"
    # one rank's forwards: each SP forward issues one reduce-scatter per row-parallel layer and one for the
    # embedding (5 for 2 layers), over its token count padded to a multiple of 2
    log = served.collectives()
    pid = min(p for (p, _, _) in log)
    sp_rows = [rows for (p, op, rows), n in log.items() if p == pid and op == "reduce_scatter" for _ in range(n)]
    forwards, tokens = len(sp_rows) // 5, sum(sp_rows) // 5
    prompt_tokens = sum(len(p) for p in CONCURRENT)
    print(f"8 concurrent requests: {forwards} SP forwards of {tokens} padded tokens for {prompt_tokens} prompt tokens")
    # sglang 0.5.23 hands a MIXED batch (a prefill chunk + 1-token decode tails) to the model as EXTEND
    # (model_executor/runner/eager_runner.py), so the decode tails show up as extra SP tokens
    assert tokens - forwards > prompt_tokens, "no decode ran inside a prefill batch (--enable-mixed-chunk)"


def _sp_decisions():
    """In the engine host (sglang imported): the adapter's SP decision for every sglang ForwardMode."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sp_core_sglang.models.causal_lm import SPCoreForCausalLM

    decisions = {}
    for enabled in (True, False):
        model = SimpleNamespace(sequence_parallel_enabled=enabled, sp_min_tokens=8)
        for mode in ForwardMode:
            # the batch offers only its mode: reading any device value (seq_lens, ...) would raise here
            batch = SimpleNamespace(forward_mode=mode)
            decisions[(enabled, mode.name)] = [SPCoreForCausalLM.runs_sequence_parallel(model, batch, n)
                                               for n in (7, 8, 9000)]
    return decisions


def test_sp_only_for_plain_extend_at_or_above_the_threshold(served):
    from sp_core_sglang.cli_engine import engine_process

    decisions = engine_process.call(_sp_decisions)
    assert decisions[(True, "EXTEND")] == [False, True, True]
    others = {mode: got for (enabled, mode), got in decisions.items() if (enabled, mode) != (True, "EXTEND")}
    assert {"MIXED", "TARGET_VERIFY", "SPLIT_PREFILL", "DECODE", "IDLE", "DLLM_EXTEND"} <= set(others)
    assert all(got == [False, False, False] for got in others.values()), others


def _rank_pid():
    return os.getpid()


def _launcher_helpers():
    from multiprocessing import forkserver, resource_tracker

    return forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid


def _alive(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _in_process_shutdown_kills_the_launchers_helpers():
    """What Engine.shutdown() does in the process that made the engine, after a launch from it."""
    from sglang.srt.utils.common import kill_process_tree

    run_ranks(2, _rank_pid)
    fork_server, _ = _launcher_helpers()  # (the engine host shares its caller's resource tracker)
    kill_process_tree(os.getpid(), include_parent=False)  # srt/entrypoints/engine.py::Engine.shutdown
    return _alive(fork_server)


def test_engine_shutdown_spares_the_launchers_helpers(served):
    """Launch ranks, shut an engine down, launch again: the fork server and resource tracker that the
    launcher started before are the same live processes (with the engine in this process, sglang's
    shutdown killed them: the negative control, run in the engine host, shows it)."""
    from sp_core_sglang.cli_engine import engine_process

    run_ranks(2, _rank_pid)
    helpers = _launcher_helpers()
    served.engine.shutdown()  # last test of the module: the fixture's own shutdown is then a no-op
    assert [_alive(pid) for pid in helpers] == [True, True]
    run_ranks(2, _rank_pid)
    assert _launcher_helpers() == helpers, "the launcher had to start new helpers"
    assert engine_process.call(_in_process_shutdown_kills_the_launchers_helpers) is False



def _descendants(root: int):
    """pid -> parent pid of every live descendant of ``root``."""
    import psutil

    try:
        return {p.pid: p.ppid() for p in psutil.Process(root).children(recursive=True) if _alive(p.pid)}
    except psutil.NoSuchProcess:
        return {}


def _alive_of(pids):
    return sorted(p for p in pids if _alive(p))


def test_sigterm_during_an_engine_start_leaves_no_sglang_process(tmp_path):
    """`sp-core logits --engine sglang`, sent SIGTERM while sglang's workers are starting: the command ends
    (exit 143) and every process it had started -- the engine host, sglang's schedulers and detokenizer --
    is gone within seconds (the host's process group ends with it)."""
    import signal
    import subprocess
    import sys
    import time

    model_dir = make_checkpoint("qwen3", str(tmp_path / "qwen3"))
    (tmp_path / "prompts.json").write_text("[[1, 2, 3]]")
    cmd = [sys.executable, "-m", "sp_core.app.cli", "logits", "--model", model_dir, "--prompts",
           str(tmp_path / "prompts.json"), "--out", str(tmp_path / "out.safetensors"), "--engine", "sglang", "--tp", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until the host's children (sglang's processes) exist
            tree = _descendants(proc.pid)
            seen |= set(tree)
            if sum(1 for ppid in tree.values() if ppid != proc.pid) >= 3:  # 2 schedulers + the detokenizer
                break
            assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("sglang's worker processes did not appear within 300 s")
        seen |= set(_descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        deadline = time.monotonic() + 20
        while _alive_of(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive_of(seen) == [], "processes left behind after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _alive_of(seen):
            os.kill(pid, signal.SIGKILL)
