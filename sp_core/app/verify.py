"""`sp-core verify`: one checkpoint through transformers, the core, Megatron and sglang, compared.

Per model x engine x tp x SP (x cp, with --cp): max |d logprob| against transformers' float32 reference (<= 1e-4),
against the core at tp 1 (<= 1e-4) and, for SP on, against the same engine and tp with SP off
(<= 1e-5); greedy tokens equal; seconds. Plus the round trip: train in Megatron (tp 2, SP) -> export to
HF -> transformers and sglang (tp 2, SP) load the export; both engines' log-probabilities are compared
with transformers' and with each other.

Exit 0 only if every row ran and is within tolerance; 1 if a row is out of tolerance or failed; 3 if
an engine that was asked for cannot run here (one line per engine says why); 2 for bad input.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from sp_core.app import console, engines
from sp_core.app.errors import EngineUnavailable, UsageError
from sp_core.models import ModelError
from sp_core.app.tiny import DEEPSEEK_MODELS, DEEPSEEK_SPARSE_MODELS, PROMPTS, make_checkpoint, reference_logprobs

DEFAULT_TP = "1,2,4"
DEFAULT_ENGINES = ("core", "megatron", "sglang")
TOLERANCE = 1e-4  # float32, against transformers and the core at tp 1 (docs/design.md, Verification)
SP_TOLERANCE = 1e-5  # float32, SP on vs off at the same engine and tp
CLEAR_MARGIN = 1e-3  # greedy tokens must agree where the reference's top-1 leads top-2 by more
DEFAULT_MODELS = ("qwen2", "qwen3", "qwen3-moe") + DEEPSEEK_MODELS + ("deepseek-v3-fp8",) + DEEPSEEK_SPARSE_MODELS
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
    bitwise: Optional[bool] = None  # --deterministic: this megatron / sglang pair of one setting is torch.equal
    sp_bitwise: Optional[bool] = None  # --deterministic, SP-on rows: torch.equal to the same engine with SP off
    notes: List[str] = field(default_factory=list)
    cp: int = 1  # context-parallel size (ranks = cp x tp)

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
    if row.bitwise is False:
        problems.append("megatron and sglang differ bitwise")
    if row.sp_bitwise is False:
        problems.append("SP on and off differ bitwise")
    row.status = "FAIL: " + "; ".join(problems) if problems else "ok"


def _error_status(err: Exception) -> str:
    return f"error: {getattr(err, 'error_message', '') or err}".splitlines()[0][:200]


def _settings(tps, cfg=None, engine_name="core", deterministic=False, cps=(1,)):
    """(tp, SP, moe_parallel, cp) rows, SP off before SP on; MoE models in the engines that take it (the core;
    sglang, as its --ep-size) also run expert parallelism (mode b) with SP (``deterministic``: and without,
    so that SP on and off are compared bit for bit); each cp > 1 of ``cps`` adds the tp x SP rows at that cp in
    the engines that take --cp."""
    for cp in [1] + [c for c in cps if c > 1 and engine_name in engines.CP_ENGINES]:
        for tp in tps:
            for sp in ((False,) if tp == 1 else (False, True)):
                yield tp, sp, "tp", cp
    if engine_name in engines.MOE_PARALLEL_ENGINES and cfg is not None and cfg.moe is not None:
        for tp in tps:
            for sp in ((False, True) if deterministic else (True,)) if tp > 1 else ():
                yield tp, sp, "ep", 1


def _engine(row: Row) -> str:
    return row.engine if row.moe == "tp" else f"{row.engine} moe={row.moe}"


def _setting(row: Row) -> str:
    """The row's column in the table: cp when > 1, tp (``ep`` for expert parallelism, moe=ep, at that tp), and SP
    when on."""
    return (f"cp{row.cp} " if row.cp > 1 else "") + f"{'tp' if row.moe == 'tp' else row.moe}{row.tp}" + (" SP" if row.sp else "")


def _line_key(row: Row) -> Tuple[str, str]:
    """The table line (and progress line) a row belongs to: model x engine (both MoE modes on one line)."""
    return row.model, row.engine


class Progress:
    """One terminal line per table line (model x engine): its settings are added as they finish, so a
    long run shows where it is without a line per row (``--verbose`` shows the frameworks' output too)."""

    def __init__(self, lines: int):
        self.total, self.index, self.current = lines, 0, None

    def start(self, row: Row) -> None:
        stream = console.err()
        if _line_key(row) != self.current:
            self.close()
            self.index, self.current = self.index + 1, _line_key(row)
            print(f"[verify {self.index}/{self.total}] {row.model} {row.engine}:", end="", file=stream)
        else:
            print(";", end="", file=stream)
        print(f" {_setting(row)}", end="", file=stream, flush=True)

    def done(self, row: Row) -> None:
        print(f" {row.status.split(':')[0]} {row.seconds:.1f} s", end="", file=console.err(), flush=True)

    def cannot_run(self) -> None:
        print(" cannot run here", end="", file=console.err(), flush=True)

    def close(self) -> None:
        if self.current is not None:
            print(file=console.err(), flush=True)
            self.current = None


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


# Left out of the default matrix (no --tp), because each sglang engine start costs more than everything else
# in a row (~15-20 s on 2 cores with spawned workers; 5-10 s loaded since the adapter forks them from a fork
# server that has imported sglang) and the README's two commands must stay under 6 minutes; an explicit --tp
# runs them. What they check is covered by rows that stay: sglang's model classes are the core's layers, so
# what sglang at tp 1 checks (the adapter's attention backend, KV cache and logits) runs again in its tp 2
# rows; DeepSeek V2 and V2-Lite differ from V3 in core code only (V2's router and shared experts, V2-Lite's
# plain q_proj without q_lora: the adapter has no code of its own for either), checked in the core's rows,
# and sglang serves both in tests/test_sglang_deepseek.py. sglang's expert parallelism (--ep-size) runs the
# core's EP MoE, checked in the core's moe=ep rows, and is served in tests/test_sglang_deepseek.py. sglang serves
# DeepSeek-V3 in the default matrix as the FP8 checkpoint: the same architecture through the same adapter code,
# plus the dequantisation at load (V3.2's rows load an unquantised V3-family checkpoint). Megatron loads an FP8
# checkpoint with the core's loader (SPCoreGPTModel holds the core's model), checked in the core's FP8 rows;
# tests/test_fp8_checkpoints.py trains from one and loads one into megatron.core's GPTModel.
DEFAULT_MATRIX_SKIPS = {"sglang": {"tps": (1,), "models": ("deepseek-v2", "deepseek-v2-lite", "deepseek-v3"),
                                   "moe": ("ep",)},
                        "megatron": {"models": ("deepseek-v3-fp8",)}}


def plan(models: Dict[str, str], tps: List[int], usable: Dict[str, object], default_matrix: bool,
         deterministic: bool = False, cps: List[int] = (1,)):
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
            skips = DEFAULT_MATRIX_SKIPS.get(engine_name, {}) if default_matrix else {}
            if model_name in skips.get("models", ()):
                continue
            cap = getattr(engine, "max_default_tp", lambda: None)() if default_matrix else None
            left_out = {tp for tp in tps if cap is not None and tp > cap} | set(skips.get("tps", ())) & set(tps)
            rows += [Row(model_name, engine_name, tp, sp, moe=moe, cp=cp)
                     for tp, sp, moe, cp in _settings(tps, cfg, engine_name, deterministic, cps)
                     if tp not in left_out and moe not in skips.get("moe", ())]
    if default_matrix:
        notes += _default_matrix_notes(models, tps, usable)
    notes += [f"{engine_name} does not run {', '.join(names)} yet (the core does)"
              for engine_name, names in not_yet.items()]
    return rows, notes


def _default_matrix_notes(models: Dict[str, str], tps: List[int], usable: Dict[str, object]) -> List[str]:
    notes = []
    for engine_name, engine in usable.items():
        skips = DEFAULT_MATRIX_SKIPS.get(engine_name, {})
        skipped_tps = sorted(set(skips.get("tps", ())) & set(tps))
        skipped_models = [m for m in skips.get("models", ()) if m in models]
        cap = getattr(engine, "max_default_tp", lambda: None)()
        capped = sorted(tp for tp in tps if cap is not None and tp > cap)
        parts = [f"at tp {','.join(map(str, skipped_tps))}"] if skipped_tps else []
        parts += [f"on {', '.join(skipped_models)}"] if skipped_models else []
        parts += ["with expert parallelism (moe=ep)"] if skips.get("moe") else []
        parts += [f"at tp {','.join(map(str, capped))} (one rank per core on this {cap}-core CPU)"] if capped else []
        if parts:
            notes.append(f"{engine_name} {', '.join(parts)}: left out of the default matrix "
                         f"(an explicit --tp runs it, e.g. --tp {DEFAULT_TP})")
    return notes


def _score(row: Row, got, reference, core_tp1=None, sp_off=None, other: Optional[Tuple[str, list]] = None) -> None:
    """Every comparison of one row's log-probabilities, then its status. ``other``: (name, log-probabilities)
    of one more engine it must agree with (the round trip: sglang serving the export vs Megatron)."""
    row.vs_reference = max_diff(got, reference)
    row.vs_core_tp1 = max_diff(got, core_tp1) if core_tp1 is not None else None
    row.vs_sp_off = max_diff(got, sp_off) if sp_off is not None else None
    row.tokens_equal = greedy_equal(got, reference)
    judge(row)
    if other is not None:
        name, theirs = other
        vs_other = max_diff(got, theirs)
        row.notes.append(f"vs {name}: {vs_other:.2e}")
        if row.passed and not vs_other <= TOLERANCE:
            row.status = f"FAIL: vs {name} {vs_other:.1e} > {TOLERANCE:g}"


def _attempt(row: Row, progress: Progress, unavailable: Dict[str, str], engine_name: str, compute):
    """``compute()`` for one row: (result, True); (None, False) when the row failed (its status says why)
    or its engine turned out unable to run here (it joins ``unavailable``)."""
    progress.start(row)
    start = time.time()
    try:
        result = compute()
    except EngineUnavailable as err:
        unavailable[engine_name] = str(err).splitlines()[0]
        progress.cannot_run()
        return None, False
    except Exception as err:  # noqa: BLE001 - a row, not a traceback
        row.status = _error_status(err)
        row.seconds = time.time() - start
        progress.done(row)
        return None, True
    row.seconds = time.time() - start
    return result, True


def run_rows(rows: List[Row], models: Dict[str, str], usable: Dict[str, object], unavailable: Dict[str, str],
             progress: Progress, prompts=PROMPTS, deterministic: bool = False) -> List[Row]:
    """Run the rows; returns those of engines that could run (an engine that turns out unable to run
    moves from ``usable`` to ``unavailable`` with its reason, and its rows are dropped). ``deterministic``:
    every engine in the deterministic mode, and each megatron / sglang pair of rows compared bit for bit."""
    mode = {"deterministic": True} if deterministic else {}
    results: Dict[Tuple[str, str, int, bool, str, int], list] = {}
    references: Dict[str, list] = {}
    core_tp1: Dict[str, list] = {}
    core_tp1_seconds: Dict[str, float] = {}
    ran: List[Row] = []
    for index, row in enumerate(rows):
        if row.engine in unavailable:
            continue
        model_dir = models[row.model]
        if row.model not in references:
            references[row.model] = reference_logprobs(model_dir, prompts)
            if "core" in usable:  # the core at tp 1 first: every other row is compared with it too
                start = time.time()
                core_tp1[row.model] = usable["core"].logprobs(model_dir, prompts, 1, False, torch.float32, **mode)
                core_tp1_seconds[row.model] = time.time() - start
        is_core_tp1 = row.engine == "core" and row.tp == 1 and row.moe == "tp" and row.cp == 1
        moe = dict(mode, **({"moe_parallel": row.moe} if row.moe != "tp" else {}), **({"cp": row.cp} if row.cp > 1 else {}))
        got, ran_here = _attempt(row, progress, unavailable, row.engine, lambda: core_tp1[row.model] if is_core_tp1 else
                                 usable[row.engine].logprobs(model_dir, prompts, row.tp, row.sp, torch.float32, **moe))
        if not ran_here:
            usable.pop(row.engine, None)
            progress.total -= len({_line_key(r) for r in rows[index + 1:] if r.engine == row.engine} - {_line_key(row)})
            continue
        ran.append(row)
        if got is None:
            continue
        if is_core_tp1:
            row.seconds = core_tp1_seconds[row.model]
        results[(row.model, row.engine, row.tp, row.sp, row.moe, row.cp)] = got
        sp_off = results.get((row.model, row.engine, row.tp, False, row.moe, row.cp)) if row.sp else None
        if deterministic and sp_off is not None:  # the mode's promise: SP on and off agree bit for bit
            row.sp_bitwise = all(torch.equal(a, b) for a, b in zip(got, sp_off))
        _score(row, got, references[row.model], core_tp1=None if is_core_tp1 else core_tp1.get(row.model),
               sp_off=sp_off)
        if deterministic:
            _mark_bitwise_pair(row, ran, results)
        progress.done(row)
    return ran


def _mark_bitwise_pair(row: Row, ran: List[Row], results) -> None:
    """When ``row`` completes a megatron / sglang pair of one setting: both rows' ``bitwise``, torch.equal;
    a difference fails both rows."""
    other = {"megatron": "sglang", "sglang": "megatron"}.get(row.engine)
    setting = (row.model, row.tp, row.sp, row.moe, row.cp)
    partner = next((r for r in ran if r.engine == other and (r.model, r.tp, r.sp, r.moe, r.cp) == setting), None)
    theirs = results.get((row.model, other, row.tp, row.sp, row.moe, row.cp))
    if partner is None or theirs is None:
        return
    mine = results[(row.model, row.engine, row.tp, row.sp, row.moe, row.cp)]
    equal = all(torch.equal(a, b) for a, b in zip(mine, theirs))
    row.bitwise = partner.bitwise = equal
    for r in (row, partner):
        if r.passed and not r.bitwise:
            judge(r)


def round_trip(model_dir: str, workdir: str, usable: Dict[str, object], unavailable: Dict[str, str],
               progress: Progress, prompts=PROMPTS, deterministic: bool = False) -> List[Row]:
    """Train in Megatron -> export -> transformers and sglang load the export; two rows (fewer when an
    engine turns out unable to run: it joins ``unavailable``)."""
    tp = ROUND_TRIP_TP
    mode = {"deterministic": True} if deterministic else {}
    reference_note = "reference: transformers loading the export"
    trained_row = Row("round-trip", "megatron (trained)", tp, True, notes=[reference_note])
    served_row = Row("round-trip", "sglang (export)", tp, True, notes=[reference_note])
    exported = os.path.join(workdir, "round-trip-export")

    def train():
        trained = usable["megatron"].train_and_export(model_dir, exported, tp=tp, sequence_parallel=True,
                                                      steps=ROUND_TRIP_STEPS, prompts=prompts, **mode)
        return trained, reference_logprobs(exported, prompts)  # transformers loading the export

    result, ran_here = _attempt(trained_row, progress, unavailable, "megatron", train)
    if not ran_here:
        return []
    if result is None:  # nothing to serve
        served_row.status = trained_row.status
        return [trained_row, served_row]
    trained, reference = result
    _score(trained_row, trained, reference)
    progress.done(trained_row)
    served, ran_here = _attempt(served_row, progress, unavailable, "sglang",
                                lambda: usable["sglang"].logprobs(exported, prompts, tp, True, torch.float32, **mode))
    if not ran_here:
        return [trained_row]
    if served is not None:
        if deterministic:
            served_row.bitwise = trained_row.bitwise = all(torch.equal(a, b) for a, b in zip(served, trained))
            if trained_row.passed and not trained_row.bitwise:
                judge(trained_row)
        _score(served_row, served, reference, other=("the Megatron model's own log-probabilities", trained))
        progress.done(served_row)
    return [trained_row, served_row]


def _num(value: Optional[float]) -> str:
    return f"{value:.1e}" if value is not None else "—"


def _max(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _tokens(rows: List[Row]) -> str:
    differ = [_setting(r) for r in rows if r.tokens_equal is False]
    if all(r.tokens_equal is None for r in rows):
        return "—"
    return "equal" if not differ else "DIFF " + ",".join(differ)


def _status(rows: List[Row]) -> str:
    failed = [r for r in rows if not r.passed]
    return "ok" if not failed else f"FAIL {len(failed)} of {len(rows)}"


# The table's columns after the settings' ones: (header, width, value of a line's rows). One entry per column.
SUMMARY_COLUMNS = [
    ("vs core tp1", 11, lambda rows: _num(_max(r.vs_core_tp1 for r in rows))),
    ("SP on/off", 9, lambda rows: _num(_max(r.vs_sp_off for r in rows))),
    ("tokens", 6, _tokens),
    ("sec", 6, lambda rows: f"{sum(r.seconds for r in rows):.1f}"),
]


def _bitwise(rows: List[Row]) -> str:
    marks = [r.bitwise for r in rows if r.bitwise is not None]
    return "—" if not marks else ("true" if all(marks) else "FALSE")


BITWISE_COLUMN = ("bitwise", 7, _bitwise)  # --deterministic: megatron == sglang, torch.equal, on every pair


def table(rows: List[Row], deterministic: bool = False) -> str:
    """One line per model x engine (both MoE modes on one line). A column per tp / SP setting (``ep``: expert
    parallelism at that tp) holds max |d logprob| against transformers
    (blank: not run; '!' marks a row out of tolerance or failed); after them, the worst of each other
    comparison over the line's settings ('—': none, e.g. the core at tp 1 is not compared with itself),
    greedy tokens (with ``deterministic``: whether every megatron / sglang pair is bitwise equal), seconds
    and the status. Failed rows are listed below the table, one line each."""
    columns = SUMMARY_COLUMNS[:-1] + [BITWISE_COLUMN] + SUMMARY_COLUMNS[-1:] if deterministic else SUMMARY_COLUMNS
    # columns: tp before expert parallelism (moe=ep), cp 1 before cp > 1, then by tp, SP off before on
    settings = sorted({(r.moe, r.cp, r.tp, r.sp) for r in rows}, key=lambda s: (s[0] != "tp", s[1], s[2], s[3]))
    names = [_setting(Row("", "", tp, sp, moe=moe, cp=cp)) for moe, cp, tp, sp in settings]
    lines: Dict[Tuple[str, str], List[Row]] = {}
    for r in rows:
        lines.setdefault(_line_key(r), []).append(r)
    model_w = max([5] + [len(m) for m, _ in lines])
    engine_w = max([6] + [len(e) for _, e in lines])
    cell_w = max([8] + [len(n) for n in names])
    out = [f"{'model':<{model_w}} {'engine':<{engine_w}} " + " ".join(f"{n:>{cell_w}}" for n in names) + " "
           + " ".join(f"{h:>{w}}" for h, w, _ in columns) + "  status"]
    for (model, engine), line_rows in lines.items():
        by_setting = {(r.moe, r.cp, r.tp, r.sp): r for r in line_rows}
        cells = []
        for key in settings:
            r = by_setting.get(key)
            cell = "" if r is None else (_num(r.vs_reference) + ("" if r.passed else "!")
                                         if r.vs_reference is not None else ("error" if not r.passed else "—"))
            cells.append(f"{cell:>{cell_w}}")
        summary = [f"{fn(line_rows):>{w}}" for _, w, fn in columns]
        out.append(f"{model:<{model_w}} {engine:<{engine_w}} " + " ".join(cells) + " " + " ".join(summary)
                   + f"  {_status(line_rows)}")
    for r in rows:
        if not r.passed:
            out.append(f"{r.status.split(':')[0]}: {r.model} {_engine(r)} {'cp=%d ' % r.cp if r.cp > 1 else ''}"
                       f"tp={r.tp} SP {'on' if r.sp else 'off'}:"
                       f"{r.status.split(':', 1)[1] if ':' in r.status else ''}")
    for r in rows:
        if r.model == "round-trip":
            out += [f"{r.model} {_engine(r)}: {note}" for note in r.notes if note.startswith("vs ")]
    return "\n".join(out)


def _check_reference_available() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise EngineUnavailable(f"verify compares with transformers, which does not import here ({err}): "
                                f"pip install 'sp-core[verify]'") from None


def check_default_models(tps) -> None:
    """Each embedded checkpoint's config splits over every tp asked for (ModelError naming it otherwise)."""
    from sp_core.app.tiny import hf_config
    from sp_core.models import ModelConfig

    for name in DEFAULT_MODELS:
        config = ModelConfig.from_dict(hf_config(name).to_dict())
        for tp in tps:
            try:
                config.check_tp(tp)
            except ModelError as err:
                raise ModelError(f"the embedded {name} checkpoint: {err}") from None


def main(args) -> int:
    _check_reference_available()
    default_matrix = args.tp is None
    tps = args.tp or [int(x) for x in DEFAULT_TP.split(",")]
    if args.model:  # bad input first: before the engines' frameworks are imported
        for tp in tps:
            engines.check_model(args.model, tp)
    else:
        check_default_models(tps)  # bad input before --keep gets a directory or a checkpoint
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
    deterministic = getattr(args, "deterministic", False)
    rows, notes = plan(models, tps, usable, default_matrix, deterministic, getattr(args, "cp", [1]))
    trip = args.round_trip and {"megatron", "sglang"} <= set(usable)
    if not rows and not trip and not unavailable:
        raise UsageError("nothing to verify: the matrix of engines x tp sizes is empty")
    console.announce("verify")
    started = time.time()
    lines = len({_line_key(r) for r in rows}) + (2 if trip else 0)
    progress = Progress(lines)
    for name in {r.engine for r in rows} | ({"sglang"} if trip else set()):  # started ahead, overlapping rows
        with contextlib.suppress(Exception):  # an engine that cannot start says so in its rows
            getattr(usable.get(name), "warm_up", lambda: None)()
    with contextlib.ExitStack() as reuse:  # engines that offer it keep one engine per checkpoint across rows
        for engine in list(usable.values()):
            reuse.enter_context(getattr(engine, "reusing", contextlib.nullcontext)())
        rows = run_rows(rows, models, usable, unavailable, progress, deterministic=deterministic)
        if trip and not {"megatron", "sglang"} <= set(usable):
            trip, progress.total = False, progress.total - 2
        if trip:
            trip_model = args.model or make_checkpoint("qwen3-train", os.path.join(workdir, "qwen3-train"))
            rows += round_trip(trip_model, workdir, usable, unavailable, progress, deterministic=deterministic)
    progress.close()
    failed = [r for r in rows if not r.passed]
    verdict = (f"FAIL: {len(failed)} of {len(rows)} rows out of tolerance or failed" if failed else
               f"PASS: all {len(rows)} rows within tolerance")
    verdict += (f" (vs transformers and core tp1 <= {TOLERANCE:g}, SP on vs off <= {SP_TOLERANCE:g}"
                f"{'; megatron == sglang and SP on == SP off bitwise' if deterministic else ''}); "
                f"{time.time() - started:.0f} s")
    out = console.out()
    if rows:
        print(table(rows, deterministic), file=out)
    print(verdict, file=out)
    for note in notes:
        print(f"note: {note}", file=out)
    for name, reason in unavailable.items():
        print(f"not run: engine {name} cannot run here: {reason}", file=out)
    if args.round_trip and not trip and ({"megatron", "sglang"} & set(unavailable)):
        print("not run: the round trip needs both megatron and sglang", file=out)
    out.flush()
    code = EXIT_FAIL if failed else (EXIT_UNAVAILABLE if unavailable else 0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "verdict": verdict, "notes": notes, "passed": code == 0,
                       "exit_code": code,
                       "unavailable": unavailable, "tolerance": TOLERANCE, "sp_tolerance": SP_TOLERANCE}, f, indent=1)
    return code
