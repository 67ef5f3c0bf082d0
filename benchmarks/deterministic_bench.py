"""GPU check and cost of the deterministic mode (issue 20), one command, NCCL, bfloat16:

    source benchmarks/device_setup.sh
    python -m benchmarks.deterministic_bench --tp 2,4 --out $OUT
    (or in two device calls: --models qwen3 --out $OUT, then --models qwen2 --no-cost --out $OUT)

1. equality: the core engine vs the Megatron engine (``sp-core logits --engine core|megatron``), SP on,
   at each t, tiny Qwen3 and Qwen2 checkpoints, prompts of 1 to 255 tokens: ``torch.equal`` in the
   deterministic mode (and, for contrast, whether the default mode happens to be equal);
2. batch invariance of the core's prefill: a prompt alone vs inside a packed batch of 8 mixed-length
   prompts, deterministic and default (SP on), plus SP on vs off in the deterministic mode;
3. cost: a prefill of Qwen3-8B-shaped layers (benchmarks/common.py's SHAPE, random bf16 weights), SP on,
   default mode (the fused collectives where ``async_tp`` says they pay) vs deterministic, same ranks,
   median of --iters: the ratio deterministic / default; the deterministic mode with its one-launch
   Triton GEMM (``lookup.batch_invariant_matmul``) and, for contrast, with the blocked torch GEMMs
   (128-row blocks, one cuBLAS call each) that it replaces on CUDA.

Writes results.json, results.md and log.txt under --out; exit 1 if a deterministic check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from benchmarks.common import SHAPE, header, random_qwen3_stack, save_results, tee_log, timed

LENGTHS = (1, 2, 5, 17, 64, 129, 200, 255)  # the tiny checkpoints' context is 256
MIXED = (5, 1, 250, 3, 64, 2, 129, 9)  # the 8 requests a prompt joins (batch invariance)


def _prompts(lengths, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def engines_equal(model_dir: str, tp: int, vocab: int, log, modes=(False, True)) -> list:
    from sp_core.app import engines

    prompts = _prompts(LENGTHS, vocab, 1)
    rows = []
    for deterministic in modes:
        start = time.time()
        core = engines.core_logprobs(model_dir, prompts, tp, True, torch.bfloat16, deterministic=deterministic)
        megatron = engines.get("megatron").logprobs(model_dir, prompts, tp, True, torch.bfloat16,
                                                    deterministic=deterministic)
        row = dict(tp=tp, deterministic=deterministic, equal=_equal(core, megatron),
                   max_diff=_max_diff(core, megatron), seconds=time.time() - start)
        log(f"  core vs megatron t={tp} SP on {'deterministic' if deterministic else 'default'}: "
            f"torch.equal {row['equal']}, max |d| {row['max_diff']:.3e}")
        rows.append(row)
    return rows


def _invariance_rank(model_dir: str, vocab: int):
    from sp_core import mpu
    from sp_core.app.runtime import load_model, prompt_logprobs

    mixed = _prompts(MIXED, vocab, 2)
    alone_prompts = [mixed[2], mixed[0], mixed[5]]  # 250, 5 and 2 tokens
    out = {}
    for deterministic in (False, True):
        model = load_model(model_dir, torch.bfloat16, parallel=mpu.default_context().replace(deterministic=deterministic))
        together = prompt_logprobs(model, mixed)
        alone = [prompt_logprobs(model, [p])[0] for p in alone_prompts]
        out["deterministic" if deterministic else "default"] = all(
            torch.equal(a, together[MIXED.index(len(p))]) for a, p in zip(alone, alone_prompts))
        if deterministic:
            with model.parallel.sequence_parallel_for(False):
                out["deterministic_sp_on_vs_off"] = _equal(prompt_logprobs(model, mixed), together)
    return out


def batch_invariance(model_dir: str, tp: int, vocab: int, log) -> dict:
    from sp_core.procs.launch import run_ranks

    result = dict(tp=tp, **run_ranks(tp, _invariance_rank, model_dir, vocab, timeout=900)[0])
    log(f"  core prefill t={tp}: alone == inside 8 mixed requests: default {result['default']}, "
        f"deterministic {result['deterministic']}; deterministic SP on == off {result['deterministic_sp_on_vs_off']}")
    return result


def _cost_rank(layers: int, tokens_list, iters: int):
    from sp_core import mpu
    from sp_core.kernels import batch_invariant, lookup
    from sp_core.layers import PackedBatch

    stacks = {mode: random_qwen3_stack(layers, parallel=context(sequence_parallel=True, deterministic=mode))
              for mode in (False, True)}  # the same weights (seed) on each mode's context
    cfg = stacks[False][0]
    kernel_choice = lookup.batch_invariant_matmul
    t = mpu.default_context().size
    rows = []
    for tokens in tokens_list:
        positions = torch.arange(tokens, device="cuda")
        batch = PackedBatch([tokens])
        x = torch.randn(tokens // t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        row = {"tp": t, "tokens": tokens}
        for label, deterministic, kernel in (("default", False, True), ("deterministic", True, True),
                                             ("deterministic_blocked", True, False)):
            stack = stacks[deterministic][1]
            # the blocked GEMMs: what the mode runs where the platform has no batch-invariant kernel
            lookup.batch_invariant_matmul = kernel_choice if kernel else (lambda device: None)

            def run():
                with batch_invariant.gemms(deterministic):
                    h = x
                    for layer in stack:
                        h = layer(h, positions, batch)
                return h

            with torch.no_grad():
                row[f"{label}_ms"], row[f"{label}_peak_bytes"] = timed(run, iters)
        lookup.batch_invariant_matmul = kernel_choice
        row["ratio"] = row["deterministic_ms"] / row["default_ms"]
        row["blocked_ratio"] = row["deterministic_blocked_ms"] / row["default_ms"]
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def cost(tp: int, layers: int, tokens_list, iters: int, log) -> list:
    from sp_core.procs.launch import run_ranks

    rows = run_ranks(tp, _cost_rank, layers, tokens_list, iters, timeout=900)[0]
    for r in rows:
        log(f"  cost t={tp} T={r['tokens']}: default {r['default_ms']:.2f} ms, deterministic "
            f"{r['deterministic_ms']:.2f} ms, ratio {r['ratio']:.3f} (with the blocked GEMMs "
            f"{r['deterministic_blocked_ms']:.2f} ms, ratio {r['blocked_ratio']:.3f})")
    return rows


def markdown(results: dict) -> str:
    lines = [f"Card: {results['device']}; torch {results['torch']}; {results['date']}; command: "
             f"`{results['command']}`", "",
             "**Core engine vs Megatron engine, SP on, bf16 (prompts of " + ", ".join(map(str, LENGTHS)) + " tokens)**",
             "", "| model | t | mode | torch.equal | max abs diff |", "|---|---|---|---|---|"]
    for r in results["equality"]:
        lines.append(f"| {r['model']} | {r['tp']} | {'deterministic' if r['deterministic'] else 'default'} | "
                     f"{r['equal']} | {r['max_diff']:.3e} |")
    lines += ["", "**Core prefill, a prompt alone vs inside 8 mixed-length requests (SP on)**", "",
              "| model | t | default | deterministic | deterministic SP on == off |", "|---|---|---|---|---|"]
    for r in results["invariance"]:
        lines.append(f"| {r['model']} | {r['tp']} | {r['default']} | {r['deterministic']} | "
                     f"{r['deterministic_sp_on_vs_off']} |")
    lines += cost_table(results)
    return "\n".join(lines) + "\n"


def cost_table(results: dict) -> list:
    """The mode's cost rows (``cost``'s results) as Markdown lines, led by a blank line and the title."""
    lines = ["", f"**Cost: prefill of {results['layers']} Qwen3-8B-shaped layers, SP on, bf16, median of "
             f"{results['iters']}**", "", "| t | tokens | default ms | deterministic ms | **deterministic / default** | "
             "deterministic, blocked GEMMs ms | blocked / default |", "|---|---|---|---|---|---|---|"]
    for r in results["cost"]:
        lines.append(f"| {r['tp']} | {r['tokens']} | {r['default_ms']:.2f} | {r['deterministic_ms']:.2f} | "
                     f"**{r['ratio']:.3f}** | {r['deterministic_blocked_ms']:.2f} | {r['blocked_ratio']:.3f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", default="2,4")
    parser.add_argument("--tokens", default="2048,8192")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--models", default="qwen3,qwen2", help="tiny checkpoints for checks 1 and 2")
    parser.add_argument("--no-cost", dest="cost", action="store_false", help="skip check 3 (the cost)")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    log = tee_log(args.out)

    from sp_core.app.tiny import make_checkpoint

    tps = [t for t in (int(x) for x in args.tp.split(",")) if t <= torch.cuda.device_count()]
    results = header(layers=args.layers, iters=args.iters, shape=SHAPE, equality=[], invariance=[], cost=[])
    workdir = tempfile.mkdtemp(prefix="sp-core-deterministic-")
    for name in [m for m in args.models.split(",") if m]:
        model_dir = make_checkpoint(name, os.path.join(workdir, name))
        with open(os.path.join(model_dir, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        for t in tps:
            log(f"{name} t={t}")
            results["equality"] += [dict(r, model=name) for r in engines_equal(model_dir, t, vocab, log)]
            results["invariance"].append(dict(batch_invariance(model_dir, t, vocab, log), model=name))
    for t in tps if args.cost else ():
        results["cost"] += cost(t, args.layers, [int(x) for x in args.tokens.split(",")], args.iters, log)
    md = markdown(results)
    save_results(args.out, results, md)
    log(md)
    failed = [r for r in results["equality"] if r["deterministic"] and not r["equal"]]
    failed += [r for r in results["invariance"] if not (r["deterministic"] and r["deterministic_sp_on_vs_off"])]
    log(f"{'FAIL' if failed else 'PASS'}: deterministic checks {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
