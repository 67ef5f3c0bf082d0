"""`sp-core verify`: one checkpoint through transformers, the core, Megatron and sglang, compared.

Per model x engine x tp x SP: max |d logprob| against transformers' float32 reference (<= 1e-4),
against the core at tp 1 (<= 1e-4) and, for SP on, against the same engine and tp with SP off
(<= 1e-5); greedy tokens equal; seconds. Plus the round trip: train in Megatron (tp 2, SP) -> export to
HF -> transformers and sglang (tp 2, SP) load the export; both engines' log-probabilities are compared
with transformers' and with each other.

Exit 0 only if every row ran and is within tolerance; 1 if a row is out of tolerance or failed; 3 if
an engine that was asked for cannot run here (one line per engine says why); 2 for bad input.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from sp_core import console, engines
from sp_core.errors import EngineUnavailable, UsageError
from sp_core.models import ModelError
from sp_core.tiny import DEEPSEEK_MODELS, DEEPSEEK_SPARSE_MODELS, PROMPTS, make_checkpoint, reference_logprobs

DEFAULT_TP = "1,2,4"
DEFAULT_ENGINES = ("core", "megatron", "sglang")
TOLERANCE = 1e-4  # float32, against transformers and the core at tp 1 (DESIGN.md, Verification)
SP_TOLERANCE = 1e-5  # float32, SP on vs off at the same engine and tp
CLEAR_MARGIN = 1e-3  # greedy tokens must agree where the reference's top-1 leads top-2 by more
DEFAULT_MODELS = ("qwen2", "qwen3") + DEEPSEEK_MODELS + DEEPSEEK_SPARSE_MODELS
ROUND_TRIP_TP, ROUND_TRIP_STEPS = 2, 3
EXIT_FAIL, EXIT_UNAVAILABLE = 1, 3


@dataclass
class Row:
    model: str
    engine: str
    tp: int
    sp: bool
    vs_reference: Optional[float] = None
    vs_core_tp1: Optional[float] = None  # None for the core at tp 1 itself (shown as "—")
    vs_sp_off: Optional[float] = None  # SP-on rows only
    tokens_equal: Optional[bool] = None
    seconds: float = 0.0
    status: str = "ok"  # ok | FAIL: ... | error: ...
    moe: str = "tp"  # MoE models: how the experts are split (ModelConfig.moe_parallel)
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def greedy_equal(got, ref) -> bool:
    for g, r in zip(got, ref):
        top2 = r.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > CLEAR_MARGIN
        if not torch.equal(g.argmax(-1)[clear], r.argmax(-1)[clear]):
            return False
    return True


def judge(row: Row) -> None:
    """Set ``row.status`` from its numbers (NaN compares false: it fails)."""
    problems = []
    if not row.vs_reference <= TOLERANCE:
        problems.append(f"vs transformers {row.vs_reference:.1e} > {TOLERANCE:g}")
    if row.vs_core_tp1 is not None and not row.vs_core_tp1 <= TOLERANCE:
        problems.append(f"vs core tp1 {row.vs_core_tp1:.1e} > {TOLERANCE:g}")
    if row.vs_sp_off is not None and not row.vs_sp_off <= SP_TOLERANCE:
        problems.append(f"vs SP off {row.vs_sp_off:.1e} > {SP_TOLERANCE:g}")
    if not row.tokens_equal:
        problems.append("greedy tokens differ")
    row.status = "FAIL: " + "; ".join(problems) if problems else "ok"


def _error_status(err: Exception) -> str:
    return f"error: {getattr(err, 'error_message', '') or err}".splitlines()[0][:200]


def _settings(tps, cfg=None, engine_name="core"):
    """(tp, SP, moe_parallel) rows; MoE models in the engines that take it (the core; sglang, as its
    --ep-size) also run expert parallelism (mode b) with SP."""
    for tp in tps:
        for sp in ((False,) if tp == 1 else (False, True)):
            yield tp, sp, "tp"
    if engine_name in engines.MOE_PARALLEL_ENGINES and cfg is not None and cfg.moe is not None:
        for tp in tps:
            if tp > 1:
                yield tp, True, "ep"


def _engine(row: Row) -> str:
    return row.engine if row.moe == "tp" else f"{row.engine} moe={row.moe}"


def _label(row: Row) -> str:
    return f"{row.model} {_engine(row)} tp={row.tp} SP {'on' if row.sp else 'off'}"


def _start(index: int, total: int, row: Row) -> None:
    print(f"[verify {index}/{total}] {_label(row)} ...", end="", file=console.err(), flush=True)


def _done(row: Row) -> None:
    value = f"{row.vs_reference:.1e}" if row.vs_reference is not None else "-"
    print(f" max|d| {value}, {row.seconds:.1f} s, {row.status.split(':')[0]}", file=console.err(), flush=True)


def check_engines(names: List[str]) -> Tuple[Dict[str, object], Dict[str, str]]:
    """(engine modules that can run here, name -> one-line reason for those that cannot)."""
    known = engines.available()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown engine {unknown[0]!r}; available: {', '.join(sorted(known))}")
    usable, reasons = {}, {}
    for name in names:  # load every engine first: adapters may register fork-server preloads
        try:
            engine = engines.get(name)
            getattr(engine, "check_available", lambda: None)()
            usable[name] = engine
        except EngineUnavailable as err:
            reasons[name] = str(err).splitlines()[0]
    return usable, reasons


def plan(models: Dict[str, str], tps: List[int], usable: Dict[str, object], default_matrix: bool):
    """The rows to run, and notes about settings left out (of the default matrix, or models an engine
    does not run yet)."""
    rows, notes, not_yet = [], [], {}
    for model_name, model_dir in models.items():
        cfg = engines.check_model(model_dir, 1)
        for engine_name, engine in usable.items():
            try:
                engines.check_engine(engine_name, cfg)
            except ModelError:
                not_yet.setdefault(engine_name, []).append(model_name)
                continue
            cap = getattr(engine, "max_default_tp", lambda: None)() if default_matrix else None
            left_out = sorted({tp for tp in tps if cap is not None and tp > cap})
            if left_out and model_name == next(iter(models)):
                notes.append(f"{engine_name} tp {','.join(map(str, left_out))} left out of the default matrix "
                             f"(one rank per core on this {cap}-core CPU; --tp {DEFAULT_TP} runs it)")
            rows += [Row(model_name, engine_name, tp, sp, moe=moe) for tp, sp, moe in _settings(tps, cfg, engine_name)
                     if tp not in left_out]
    notes += [f"{engine_name} does not run {', '.join(names)} yet (the core does)" for engine_name, names in not_yet.items()]
    return rows, notes


def run_rows(rows: List[Row], models: Dict[str, str], usable: Dict[str, object], unavailable: Dict[str, str],
             prompts=PROMPTS, total: Optional[int] = None) -> List[Row]:
    """Run the rows; returns those of engines that could run (an engine that turns out unable to run
    moves from ``usable`` to ``unavailable`` with its reason, and its rows are dropped)."""
    results: Dict[Tuple[str, str, int, bool, str], list] = {}
    references: Dict[str, list] = {}
    core_tp1: Dict[str, list] = {}
    core_tp1_seconds: Dict[str, float] = {}
    ran: List[Row] = []
    for index, row in enumerate(rows, 1):
        if row.engine in unavailable:
            continue
        model_dir = models[row.model]
        if row.model not in references:
            references[row.model] = reference_logprobs(model_dir, prompts)
            if "core" in usable:  # the core at tp 1 first: every other row is compared with it too
                start = time.time()
                core_tp1[row.model] = usable["core"].logprobs(model_dir, prompts, 1, False, torch.float32)
                core_tp1_seconds[row.model] = time.time() - start
        _start(index, total or len(rows), row)
        start = time.time()
        try:
            if row.engine == "core" and row.tp == 1:
                got = core_tp1[row.model]
            else:
                got = usable[row.engine].logprobs(model_dir, prompts, row.tp, row.sp, torch.float32,
                                                  **({"moe_parallel": row.moe} if row.moe != "tp" else {}))
        except EngineUnavailable as err:
            unavailable[row.engine] = str(err).splitlines()[0]
            usable.pop(row.engine, None)
            print(" cannot run here", file=console.err(), flush=True)
            continue
        except Exception as err:  # noqa: BLE001 - a row, not a traceback
            row.status, row.seconds = _error_status(err), time.time() - start
            ran.append(row)
            _done(row)
            continue
        ran.append(row)
        row.seconds = core_tp1_seconds[row.model] if got is core_tp1.get(row.model) else time.time() - start
        results[(row.model, row.engine, row.tp, row.sp, row.moe)] = got
        row.vs_reference = max_diff(got, references[row.model])
        if row.model in core_tp1 and not (row.engine == "core" and row.tp == 1):
            row.vs_core_tp1 = max_diff(got, core_tp1[row.model])
        sp_off = results.get((row.model, row.engine, row.tp, False, row.moe))
        if row.sp and sp_off is not None:
            row.vs_sp_off = max_diff(got, sp_off)
        row.tokens_equal = greedy_equal(got, references[row.model])
        judge(row)
        _done(row)
    return ran


def round_trip(model_dir: str, workdir: str, usable: Dict[str, object], unavailable: Dict[str, str],
               first_index: int, total: int, prompts=PROMPTS) -> List[Row]:
    """Train in Megatron -> export -> transformers and sglang load the export; two rows (none when an
    engine turns out unable to run: it joins ``unavailable``)."""
    tp = ROUND_TRIP_TP
    trained_row = Row("round-trip", "megatron (trained)", tp, True)
    served_row = Row("round-trip", "sglang (export)", tp, True)
    exported = os.path.join(workdir, "round-trip-export")
    _start(first_index, total, trained_row)
    start = time.time()
    try:
        trained = usable["megatron"].train_and_export(model_dir, exported, tp=tp, sequence_parallel=True,
                                                      steps=ROUND_TRIP_STEPS, prompts=prompts)
        reference = reference_logprobs(exported, prompts)  # transformers loading the export
    except EngineUnavailable as err:
        unavailable["megatron"] = str(err).splitlines()[0]
        print(" cannot run here", file=console.err(), flush=True)
        return []
    except Exception as err:  # noqa: BLE001
        for row in (trained_row, served_row):
            row.status, row.seconds = _error_status(err), time.time() - start
        _done(trained_row)
        return [trained_row, served_row]
    trained_row.seconds = time.time() - start
    trained_row.vs_reference, trained_row.tokens_equal = max_diff(trained, reference), greedy_equal(trained, reference)
    judge(trained_row)
    _done(trained_row)
    _start(first_index + 1, total, served_row)
    start = time.time()
    try:
        served = usable["sglang"].logprobs(exported, prompts, tp, True, torch.float32)
    except EngineUnavailable as err:
        unavailable["sglang"] = str(err).splitlines()[0]
        print(" cannot run here", file=console.err(), flush=True)
        return [trained_row]
    except Exception as err:  # noqa: BLE001
        served_row.status, served_row.seconds = _error_status(err), time.time() - start
        _done(served_row)
        return [trained_row, served_row]
    served_row.seconds = time.time() - start
    served_row.vs_reference, served_row.tokens_equal = max_diff(served, reference), greedy_equal(served, reference)
    judge(served_row)
    vs_trained = max_diff(served, trained)
    served_row.notes.append(f"vs the Megatron model's own log-probabilities: {vs_trained:.2e}")
    if served_row.passed and not vs_trained <= TOLERANCE:
        served_row.status = f"FAIL: vs Megatron {vs_trained:.1e} > {TOLERANCE:g}"
    _done(served_row)
    for row in (trained_row, served_row):
        row.notes.append("reference: transformers loading the export")
    return [trained_row, served_row]


def table(rows: List[Row]) -> str:
    def num(v: Optional[float]) -> str:
        return f"{v:.2e}" if v is not None else "—"

    lines = [f"{'model':<16} {'engine':<18} {'tp':>2} {'SP':<3} {'vs transf.':>10} {'vs core tp1':>11} "
             f"{'vs SP off':>9} {'tokens':<6} {'sec':>5}  status"]
    for r in rows:
        tokens = "—" if r.tokens_equal is None else ("equal" if r.tokens_equal else "DIFF")
        lines.append(f"{r.model:<16} {_engine(r):<18} {r.tp:>2} {'on' if r.sp else 'off':<3} {num(r.vs_reference):>10} "
                     f"{num(r.vs_core_tp1):>11} {num(r.vs_sp_off):>9} {tokens:<6} {r.seconds:5.1f}  {r.status}")
    return "\n".join(lines)


def _check_reference_available() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise EngineUnavailable(f"verify compares with transformers, which does not import here ({err}): "
                                f"pip install 'sp-core[verify]'") from None


def main(args) -> int:
    _check_reference_available()
    default_matrix = args.tp is None
    tps = args.tp or [int(x) for x in DEFAULT_TP.split(",")]
    if args.model:  # bad input first: before the engines' frameworks are imported
        for tp in tps:
            engines.check_model(args.model, tp)
    usable, unavailable = check_engines(args.engines)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        workdir = os.path.abspath(args.keep)
    else:
        workdir = tempfile.mkdtemp(prefix="sp-core-verify-")
    try:
        return _verify(args, tps, default_matrix, usable, unavailable, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _verify(args, tps, default_matrix, usable, unavailable, workdir) -> int:
    if args.model:
        models = {"model": args.model}
    else:
        models = {name: make_checkpoint(name, os.path.join(workdir, name)) for name in DEFAULT_MODELS}
    for name, model_dir in models.items():  # bad input before any row runs
        for tp in tps:
            try:
                engines.check_model(model_dir, tp)
            except Exception as err:
                raise type(err)(f"{'the embedded ' + name + ' checkpoint: ' if not args.model else ''}{err}") from None
    rows, notes = plan(models, tps, usable, default_matrix)
    trip = args.round_trip and {"megatron", "sglang"} <= set(usable)
    total = len(rows) + (2 if trip else 0)
    if total == 0 and not unavailable:
        raise UsageError("nothing to verify: the matrix of engines x tp sizes is empty")
    console.announce("verify")
    started = time.time()
    rows = run_rows(rows, models, usable, unavailable, total=total)
    trip = trip and {"megatron", "sglang"} <= set(usable)
    if trip:
        trip_model = args.model or make_checkpoint("qwen3-train", os.path.join(workdir, "qwen3-train"))
        rows += round_trip(trip_model, workdir, usable, unavailable, total - 1, total)
    failed = [r for r in rows if not r.passed]
    verdict = (f"FAIL: {len(failed)} of {len(rows)} rows out of tolerance or failed" if failed else
               f"PASS: all {len(rows)} rows within tolerance")
    verdict += (f" (vs transformers and core tp1 <= {TOLERANCE:g}, SP on vs off <= {SP_TOLERANCE:g}); "
                f"{time.time() - started:.0f} s")
    out = console.out()
    if rows:
        print(table(rows), file=out)
    for note in notes:
        verdict += f"; {note}"
    print(verdict, file=out)
    for name, reason in unavailable.items():
        print(f"not run: engine {name} cannot run here: {reason}", file=out)
    if args.round_trip and not trip and ({"megatron", "sglang"} & set(unavailable)):
        print("not run: the round trip needs both megatron and sglang", file=out)
    out.flush()
    code = EXIT_FAIL if failed else (EXIT_UNAVAILABLE if unavailable else 0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "verdict": verdict, "passed": code == 0, "exit_code": code,
                       "unavailable": unavailable, "tolerance": TOLERANCE, "sp_tolerance": SP_TOLERANCE}, f, indent=1)
    return code
