"""`sp-core onpolicy`: an on-policy loop that proves the in-memory refit. sglang (the adapter, a real
``sglang.Engine``) samples completions, Megatron (the adapter, its DDP and optimizer) computes its own
log-probabilities of them and trains one step, and the new weights are refit into the running engine
(no export, no restart); every iteration compares sglang's log-probabilities with Megatron's.

Exit 0 iff every comparison (each iteration's, and one after the last refit) is bitwise under
``--deterministic`` at matched layout (within 1e-5 otherwise, and with ``--server-tp`` other than ``--tp``:
the reshard path) and the served weight version advanced at every refit; 1 otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import List

from sp_core.app import console, engines
from sp_core.app.tiny import PROMPTS, make_checkpoint

DEFAULT_MODEL = "qwen3"
TOLERANCE = 1e-5
NEW_TOKENS, SEED, LR = 8, 1234, 1e-3


def _passed(check: dict, deterministic: bool) -> bool:
    return check["bitwise"] if deterministic else check["max_abs_delta"] <= TOLERANCE


def verdict(rows: List[dict], last: dict, bitwise_expected: bool) -> List[str]:
    """What failed (one phrase each; empty: the run passed): an iteration whose sglang and Megatron
    log-probabilities differ (at all when ``bitwise_expected``, by more than ``TOLERANCE`` otherwise), a refit
    whose version was not the one served next, and the check after the last refit."""
    failures = [f"iteration {r['iteration']}: {'not bitwise' if bitwise_expected else 'off by'} "
                f"{r['max_abs_delta']:.3g}" for r in rows if not _passed(r, bitwise_expected)]
    failures += [f"iteration {r['iteration']}: the served version did not become {r['refit_version']}"
                 for r in rows if not r["version_advanced"]]
    if not _passed(last, bitwise_expected):
        failures.append(f"after the last refit: max |d logprob| {last['max_abs_delta']:.3g}")
    return failures


def _table(rows: List[dict]) -> List[str]:
    lines = [f"{'iter':>4}  {'version':>8}  {'refit s':>8}  {'bytes/rank':>12}  {'full tensors':>12}  "
             f"{'max|d logprob|':>14}  bitwise"]
    for r in rows:
        per_rank = "/".join(str(b) for b in sorted(set(r["bytes_per_rank"])))
        lines.append(f"{r['iteration']:>4}  {r['weight_version']:>8}  {r['refit_seconds']:>8.3f}  {per_rank:>12}  "
                     f"{r['full_tensors']:>12}  {r['max_abs_delta']:>14.3g}  {'yes' if r['bitwise'] else 'no'}")
    return lines


def main(args) -> int:
    tp, server_tp = args.tp, args.server_tp or args.tp
    sp = tp > 1 if args.sequence_parallel is None else args.sequence_parallel
    bitwise_expected = args.deterministic and server_tp == tp  # another tp sums in another order: within 1e-5
    workdir = tempfile.mkdtemp(prefix="sp-core-onpolicy-")
    try:
        model_dir = args.model or make_checkpoint(DEFAULT_MODEL, os.path.join(workdir, DEFAULT_MODEL))
        engines.check_model(model_dir, tp, args.moe_parallel)
        if server_tp != tp:
            engines.check_model(model_dir, server_tp, args.moe_parallel)
        megatron, sglang = engines.get("megatron"), engines.get("sglang")
        megatron.check_available()
        sglang.check_available()
        console.announce("onpolicy")
        console.say(f"sp-core onpolicy: {args.model or 'embedded tiny ' + DEFAULT_MODEL} | tp {tp} | server tp "
                    f"{server_tp} | sequence parallel {'on' if sp else 'off'} | MoE {args.moe_parallel} | "
                    f"{'deterministic' if args.deterministic else 'default mode'} | {args.steps} steps")
        engine = sglang.start_for_refit(model_dir, server_tp, sp, args.moe_parallel, args.deterministic,
                                        random_seed=SEED)  # the sampler's draws
        try:
            result = megatron.onpolicy(model_dir, engine, tp, sp, args.moe_parallel, args.deterministic, args.steps,
                                       PROMPTS, NEW_TOKENS, LR, args.bucket_mb * 2**20)
        finally:
            engine.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows, last = result["rows"], result["after_last_refit"]
    for line in _table(rows):
        print(line, file=console.out(), flush=True)
    console.say(f"after the last refit: version {last['weight_version']} served, max |d logprob| "
                f"{last['max_abs_delta']:.3g} ({'bitwise' if last['bitwise'] else 'not bitwise'})")
    failures = verdict(rows, last, bitwise_expected)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tp": tp, "server_tp": server_tp, "sequence_parallel": sp, "moe_parallel": args.moe_parallel,
                       "deterministic": args.deterministic, "rows": rows, "after_last_refit": last,
                       "passed": not failures}, f, indent=2)
    if failures:
        console.say(f"sp-core onpolicy: FAIL ({'; '.join(failures)})")
        return 1
    console.say(f"sp-core onpolicy: PASS ({len(rows)} refits, every one "
                f"{'bitwise' if bitwise_expected else f'within {TOLERANCE:g}'}, the weight version advanced each time)")
    return 0
