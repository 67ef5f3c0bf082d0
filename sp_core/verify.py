"""`sp-core verify`: one checkpoint through transformers, the core, Megatron and sglang, compared.

Per model x engine x tp x SP: max |d logprob| against transformers' float32 reference and against the
core at tp 1, greedy tokens equal, seconds. Plus the round trip: train in Megatron (tp 2, SP) ->
export to HF -> serve the export in sglang (tp 2, SP) -> compare with the Megatron model's own
log-probabilities. Exit 0 only if every row that ran is within tolerance.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from sp_core import engines
from sp_core.tiny import DEEPSEEK_MODELS, PROMPTS, make_checkpoint, reference_logprobs

DEFAULT_TP = "1,2,4"
TOLERANCE = 1e-4  # float32, against transformers (DESIGN.md, Verification)
CLEAR_MARGIN = 1e-3  # greedy tokens must agree where the reference's top-1 leads top-2 by more


@dataclass
class Row:
    model: str
    engine: str
    tp: int
    sp: bool
    vs_reference: Optional[float] = None
    vs_core_tp1: Optional[float] = None
    tokens_equal: Optional[bool] = None
    seconds: float = 0.0
    status: str = "ok"  # ok | FAIL | unavailable: ... | error: ...
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "ok" or self.status.startswith("unavailable")


def max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def greedy_equal(got, ref) -> bool:
    for g, r in zip(got, ref):
        top2 = r.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > CLEAR_MARGIN
        if not torch.equal(g.argmax(-1)[clear], r.argmax(-1)[clear]):
            return False
    return True


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _settings(tps, cfg=None, engine_name="core"):
    """(tp, SP, moe_parallel) rows; MoE models in the core also run expert parallelism (mode b) with SP."""
    for tp in tps:
        for sp in ((False,) if tp == 1 else (False, True)):
            yield tp, sp, "tp"
    if engine_name == "core" and cfg is not None and cfg.moe is not None:
        for tp in tps:
            if tp > 1:
                yield tp, True, "ep"


def run_matrix(models: dict, tps: List[int], engine_names: List[str], prompts=PROMPTS,
               default_matrix: bool = False) -> List[Row]:
    rows: List[Row] = []
    for name in engine_names:  # load every engine first: adapters may register fork-server preloads
        try:
            engines.get(name)
        except engines.EngineUnavailable:
            pass
    for model_name, model_dir in models.items():
        ref = reference_logprobs(model_dir, prompts)
        core_tp1 = None
        cfg = engines.check_model(model_dir, 1)
        for engine_name in engine_names:
            try:
                engine = engines.get(engine_name)
            except engines.EngineUnavailable as err:
                rows.append(Row(model_name, engine_name, 0, False, status=f"unavailable: {err}"))
                _progress(f"[verify] {model_name} {engine_name}: unavailable ({err})")
                continue
            try:
                engines.check_engine(engine_name, cfg)
            except engines.EngineUnavailable as err:
                rows.append(Row(model_name, engine_name, 0, False, status=f"unavailable: {err}"))
                continue
            cap = getattr(engine, "max_default_tp", lambda: None)() if default_matrix else None
            for tp, sp, moe in _settings(tps, cfg, engine_name):
                row = Row(model_name, engine_name if moe == "tp" else f"{engine_name} moe=ep", tp, sp)
                if cap is not None and tp > cap:
                    row.status = (f"unavailable: not in the default matrix here ({engine_name} on CPU runs one "
                                  f"rank per core; {cap} cores); ask for it with --tp")
                    rows.append(row)
                    continue
                try:
                    engines.check_model(model_dir, tp, moe)
                except Exception as err:  # a tp this model cannot be split by
                    row.status = f"unavailable: {err}"
                    rows.append(row)
                    continue
                _progress(f"[verify] {model_name} {row.engine} tp={tp} sp={'on' if sp else 'off'} ...")
                start = time.time()
                try:
                    got = engine.logprobs(model_dir, prompts, tp, sp, torch.float32,
                                          **({"moe_parallel": moe} if moe != "tp" else {}))
                except engines.EngineUnavailable as err:
                    row.status = f"unavailable: {err}"
                    rows.append(row)
                    _progress(f"[verify]   unavailable ({err})")
                    continue
                except Exception as err:  # noqa: BLE001 - a row, not a traceback
                    row.status = f"error: {getattr(err, 'error_message', '') or err}".splitlines()[0][:200]
                    row.seconds = time.time() - start
                    rows.append(row)
                    continue
                row.seconds = time.time() - start
                if engine_name == "core" and tp == 1:
                    core_tp1 = got
                row.vs_reference = max_diff(got, ref)
                row.vs_core_tp1 = max_diff(got, core_tp1) if core_tp1 is not None else None
                row.tokens_equal = greedy_equal(got, ref)
                ok = row.vs_reference <= TOLERANCE and row.tokens_equal and (
                    row.vs_core_tp1 is None or row.vs_core_tp1 <= TOLERANCE)
                row.status = "ok" if ok else "FAIL"
                rows.append(row)
                _progress(f"[verify]   max|d| vs transformers {row.vs_reference:.2e}, {row.seconds:.1f} s, {row.status}")
    return rows


def round_trip(model_dir: str, workdir: str, tp: int = 2, steps: int = 3, prompts=PROMPTS) -> Row:
    """Train in Megatron -> export -> serve in sglang; compare with Megatron's own log-probabilities."""
    row = Row("round-trip", "megatron->sglang", tp, True)
    start = time.time()
    try:
        megatron, sglang = engines.get("megatron"), engines.get("sglang")
    except engines.EngineUnavailable as err:
        row.status = f"unavailable: {err}"
        return row
    _progress(f"[verify] round trip: train {steps} steps in Megatron (tp={tp}, SP) -> export -> sglang (tp={tp}, SP)")
    try:
        exported = f"{workdir}/round-trip-export"
        megatron.check_available()
        sglang.check_available()
        trained = megatron.train_and_export(model_dir, exported, tp=tp, sequence_parallel=True, steps=steps,
                                            prompts=prompts)
        served = sglang.logprobs(exported, prompts, tp, True, torch.float32)
    except engines.EngineUnavailable as err:
        row.status = f"unavailable: {err}"
        return row
    except Exception as err:  # noqa: BLE001
        row.status = f"error: {getattr(err, 'error_message', '') or err}".splitlines()[0][:200]
        row.seconds = time.time() - start
        return row
    row.seconds = time.time() - start
    row.vs_reference = max_diff(served, trained)
    row.tokens_equal = greedy_equal(served, trained)
    row.status = "ok" if row.vs_reference <= TOLERANCE and row.tokens_equal else "FAIL"
    row.notes.append("reference: the Megatron model's own log-probabilities after training")
    return row


def table(rows: List[Row]) -> str:
    head = f"{'model':<16} {'engine':<17} {'tp':>2} {'SP':<3} {'max|d| ref':>10} {'vs core tp1':>11} {'tokens':<6} {'sec':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        fmt = lambda v: f"{v:.2e}" if v is not None else "-"  # noqa: E731
        lines.append(f"{r.model:<16} {r.engine:<17} {r.tp or '-':>2} {('on' if r.sp else 'off') if r.tp else '-':<3} "
                     f"{fmt(r.vs_reference):>10} {fmt(r.vs_core_tp1):>11} "
                     f"{'-' if r.tokens_equal is None else ('equal' if r.tokens_equal else 'DIFF'):<6} "
                     f"{r.seconds:6.1f}  {r.status}")
    return "\n".join(lines)


def main(args) -> int:
    default_matrix = args.tp is None
    tps = [int(x) for x in str(args.tp or DEFAULT_TP).split(",") if x]
    engine_names = [x for x in args.engines.split(",") if x]
    workdir = tempfile.mkdtemp(prefix="sp-core-verify-")
    if args.model:
        models = {"model": args.model}
        engines.check_model(args.model, 1)
    else:
        _progress(f"[verify] writing the embedded tiny checkpoints to {workdir}")
        models = {name: make_checkpoint(name, f"{workdir}/{name}") for name in ("qwen2", "qwen3") + DEEPSEEK_MODELS}
    started = time.time()
    rows = run_matrix(models, tps, engine_names, default_matrix=default_matrix)
    if getattr(args, "round_trip", True) and {"megatron", "sglang"} <= set(engine_names):
        trip_model = args.model or make_checkpoint("qwen3-train", f"{workdir}/qwen3-train")
        rows.append(round_trip(trip_model, workdir))
    print(table(rows))
    failed = [r for r in rows if not r.passed]
    skipped = [r for r in rows if r.status.startswith("unavailable")]
    ran = len(rows) - len(skipped)
    verdict = (f"FAIL: {len(failed)} of {ran} rows out of tolerance (max |d logprob| <= {TOLERANCE})" if failed else
               f"PASS: all {ran} rows within tolerance (max |d logprob| <= {TOLERANCE})")
    if skipped:
        verdict += f"; {len(skipped)} not run (see status)"
    print(f"{verdict}; {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "verdict": verdict, "passed": not failed,
                       "tolerance": TOLERANCE}, f, indent=1)
    return 1 if failed else 0
