"""`sp-core onpolicy`: an on-policy loop that proves the in-memory refit. sglang (the adapter, a real
``sglang.Engine``) samples completions, Megatron (the adapter, its DDP and optimizer) computes its own
log-probabilities of them and trains one step, and the new weights are refit into the running engine
(no export, no restart); every iteration compares sglang's log-probabilities with Megatron's.

Exit 0 iff every comparison (each iteration's, and one after the last refit) is bitwise under
``--deterministic`` at matched layout (within 1e-5 otherwise, and with ``--server-tp`` other than ``--tp`` or
``--server-moe-parallel`` other than ``--moe-parallel``: the reshard path) and the served weight version advanced
at every refit; 1 otherwise, and at once when a refit is refused (after a ``--colocate`` release the engine then
holds no valid weights).

``--colocate`` releases the engine's memory (sglang's ``release_memory_occupation``, every tag) while Megatron trains
and resumes it around the refit (``sp_core_sglang.colocate``). Where sglang's release keeps the weights (its memory
saver is CUDA-only: on CPU), the resumed weights are overwritten with NaN before the refit, standing for the garbage a
real release leaves: the loop passes only if the refit rewrites every served parameter.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import List, Optional

from sp_core.app import console, engines
from sp_core.app.tiny import PROMPTS, make_checkpoint
from sp_core.mpu import platform

DEFAULT_MODEL = "qwen3"
TOLERANCE = 1e-5
NEW_TOKENS, SEED, LR = 8, 1234, 1e-3


def _passed(check: dict, deterministic: bool) -> bool:
    return check["bitwise"] if deterministic else check["max_abs_delta"] <= TOLERANCE


def bitwise_promised(deterministic: bool, same_layout: bool) -> bool:
    """Whether every comparison must be bitwise (else within ``TOLERANCE``): in the deterministic mode at matched
    layout (another server tp or MoE mode sums in another order)."""
    return deterministic and same_layout


def verdict(rows: List[dict], last: Optional[dict], bitwise_expected: bool, stopped: str = "") -> List[str]:
    """What failed (one phrase each; empty: the run passed): an iteration whose sglang and Megatron
    log-probabilities differ (at all when ``bitwise_expected``, by more than ``TOLERANCE`` otherwise), a refit
    whose version was not the one served next, the check after the last refit, and a loop stopped by a refused
    refit (``stopped``, its reason; then there is no check after the last refit)."""
    failures = [f"iteration {r['iteration']}: {'not bitwise' if bitwise_expected else 'off by'} "
                f"{r['max_abs_delta']:.3g}" for r in rows if not _passed(r, bitwise_expected)]
    failures += [f"iteration {r['iteration']}: the served version did not become {r['refit_version']}"
                 for r in rows if not r["version_advanced"]]
    if stopped:
        failures.append(f"stopped: {stopped}")
    elif not _passed(last, bitwise_expected):
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
    moe, server_moe = args.moe_parallel, args.server_moe_parallel or args.moe_parallel
    sp = tp > 1 if args.sequence_parallel is None else args.sequence_parallel
    on_cpu = platform.device_type() == "cpu"
    workdir = tempfile.mkdtemp(prefix="sp-core-onpolicy-")
    try:
        model_dir = args.model or make_checkpoint(DEFAULT_MODEL, os.path.join(workdir, DEFAULT_MODEL))
        engines.check_model(model_dir, tp, moe)
        bitwise_expected = bitwise_promised(args.deterministic, (server_tp, server_moe) == (tp, moe))
        if (server_tp, server_moe) != (tp, moe):
            engines.check_model(model_dir, server_tp, server_moe,
                                moe_flag="--server-moe-parallel" if args.server_moe_parallel else "--moe-parallel")
        megatron, sglang = engines.get("megatron"), engines.get("sglang")
        megatron.check_available()
        sglang.check_available()
        console.announce("onpolicy")
        console.say(f"sp-core onpolicy: {args.model or 'embedded tiny ' + DEFAULT_MODEL} | tp {tp} | server tp "
                    f"{server_tp} | sequence parallel {'on' if sp else 'off'} | MoE {moe}"
                    f"{'' if server_moe == moe else f', server MoE {server_moe}'} | "
                    f"{'deterministic' if args.deterministic else 'default mode'} | {args.steps} steps"
                    f"{' | colocated' if args.colocate else ''}")
        if args.colocate and on_cpu:
            console.say("sp-core onpolicy: --colocate on CPU: sglang's release keeps the weights here (its memory saver "
                        "is CUDA-only), so each resume overwrites them with NaN before the refit")
        engine = sglang.start_for_refit(model_dir, server_tp, sp, server_moe, args.deterministic,
                                        random_seed=SEED,  # the sampler's draws
                                        **({"enable_memory_saver": True} if args.colocate and not on_cpu else {}))
        try:
            result = megatron.onpolicy(model_dir, engine, tp, sp, moe, args.deterministic, args.steps,
                                       PROMPTS, NEW_TOKENS, LR, args.bucket_mb * 2**20, args.colocate)
        finally:
            engine.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows, last, stopped = result["rows"], result["after_last_refit"], result["stopped"]
    for line in _table(rows):
        print(line, file=console.out(), flush=True)
    if last is not None:
        console.say(f"after the last refit: version {last['weight_version']} served, max |d logprob| "
                    f"{last['max_abs_delta']:.3g} ({'bitwise' if last['bitwise'] else 'not bitwise'})")
    failures = verdict(rows, last, bitwise_expected, stopped)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tp": tp, "server_tp": server_tp, "sequence_parallel": sp, "moe_parallel": moe,
                       "server_moe_parallel": server_moe, "deterministic": args.deterministic,
                       "colocate": args.colocate, "rows": rows, "after_last_refit": last, "stopped": stopped,
                       "passed": not failures}, f, indent=2)
    if failures:
        console.say(f"sp-core onpolicy: FAIL ({'; '.join(failures)})")
        return 1
    console.say(f"sp-core onpolicy: PASS ({len(rows)} refits, every one "
                f"{'bitwise' if bitwise_expected else f'within {TOLERANCE:g}'}, the weight version advanced each time)")
    return 0
