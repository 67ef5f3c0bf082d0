"""The ``sp-core`` command: logits, verify, memory and onpolicy (the public surface: README, "The public commands")
and train.

Exit codes: 0 success; 1 verify found rows out of tolerance (or an unexpected error, traceback in the
log); 2 bad input; 3 an engine or framework that was asked for cannot run here; 4 NaN or inf in the
results; 5 a rank failed, died or hung; 130 / 143 interrupted (SIGINT / SIGTERM).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import traceback
from typing import List, Optional, Sequence

from sp_core import settings
from sp_core.app import console, interrupts
from sp_core.app.errors import EngineUnavailable, NonFiniteError, UsageError
from sp_core.models import ModelError

DTYPES = ("float32", "bfloat16")
EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NONFINITE, EXIT_RANK = 1, 2, 3, 4, 5
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal
_EXIT_BY_ERROR = {"ModelError": EXIT_USAGE, "UsageError": EXIT_USAGE, "EngineUnavailable": EXIT_UNAVAILABLE,
                  "NonFiniteError": EXIT_NONFINITE}
MAX_CPU_RANKS_ENV = "SP_CORE_MAX_CPU_RANKS"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) and exit 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def tp_list(text: str) -> List[int]:
    sizes = []
    for part in text.split(","):
        try:
            sizes.append(positive_int(part.strip()))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 1,2,4; "
                                             f"got {text!r}") from None
    return sorted(set(sizes))


def name_list(text: str) -> List[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated engine names, e.g. core,megatron; got {text!r}")
    return list(dict.fromkeys(names))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show the frameworks' own output (default: it goes to a log file, whose path is printed)")


def _add_cp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cp", type=positive_int, default=1, metavar="N",
                   help="context-parallel size: each sequence split over N ranks (zig-zag), ranks = cp x tp, TP "
                        "innermost (default: 1)")


def _add_sp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequence-parallel", dest="sequence_parallel", action=argparse.BooleanOptionalAction,
                   default=None, help="sequence parallelism on or off (default: on when tp > 1)")


def _add_deterministic_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--deterministic", action="store_true",
                   help=f"the deterministic mode (Megatron's deterministic_mode, sglang's "
                        f"--enable-deterministic-inference): batch-invariant collectives and GEMMs, {what} "
                        f"(default: off)")


def _add_moe_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moe-parallel", choices=("tp", "ep"), default="tp",
                   help="MoE layers (DeepSeek): tp = every rank holds 1/t of every expert (default); "
                        "ep = expert parallelism over the TP group, n_routed_experts/t whole experts per rank")


def _parser() -> argparse.ArgumentParser:
    from sp_core.app import engines, verify

    parser = _Parser(prog="sp-core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{logits,verify,memory,onpolicy,train}")
    engine_names = sorted(engines.available())

    p = sub.add_parser("logits", help="log-probabilities of prompts at every position, to a safetensors file")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face checkpoint directory (required)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="JSON list of lists of token ids, e.g. [[1, 2, 3], [7]] (required)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output .safetensors: logprobs.{i} float32 [len_i, vocab] per prompt (required)")
    p.add_argument("--engine", default="core", choices=engine_names, help="engine (default: core)")
    p.add_argument("--tp", type=positive_int, default=1, metavar="N", help="tensor-parallel size (default: 1)")
    _add_cp_flag(p)
    _add_sp_flag(p)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    _add_deterministic_flag(p, "so that the megatron and sglang engines give bit-identical log-probabilities")
    p.add_argument("--force", action="store_true",
                   help="allow --out to overwrite an input or land inside the checkpoint directory (default: refuse)")
    _common(p)
    _add_moe_flag(p)

    p = sub.add_parser("verify", help="compare every engine x tp x SP setting with transformers and each other")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint directory (default: the embedded tiny Qwen2, Qwen3 and DeepSeek checkpoints)")
    p.add_argument("--tp", type=tp_list, default=None, metavar="N,N",
                   help=f"comma-separated tp sizes (default: {verify.DEFAULT_TP}, less what other rows cover: sglang at tp 1 "
                        f"and on DeepSeek V2 / V2-Lite, and on CPU beyond the cores; an explicit --tp runs all of it)")
    p.add_argument("--cp", type=tp_list, default=[1], metavar="N,N",
                   help="comma-separated context-parallel sizes (default: 1); rows with cp > 1 run cp x tp ranks, "
                        "in the engines that take --cp")
    p.add_argument("--engines", type=name_list, default=list(verify.DEFAULT_ENGINES), metavar="NAME,NAME",
                   help=f"engines to verify; each must be able to run (default: {','.join(verify.DEFAULT_ENGINES)})")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON (default: none)")
    p.add_argument("--no-round-trip", dest="round_trip", action="store_false",
                   help="skip the train-in-Megatron -> export -> serve-in-sglang round trip (default: run it "
                        "when both engines are verified)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="keep the working files (checkpoints, export) in this new directory (default: removed)")
    _add_deterministic_flag(p, "and a 'bitwise' column: megatron and sglang must agree bit for bit")
    _common(p)

    p = sub.add_parser("memory", help="the paper's activation-memory formulas, and bytes saved for backward")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face checkpoint directory (required)")
    p.add_argument("--tp", type=positive_int, required=True, metavar="N", help="tensor-parallel size (required)")
    _add_cp_flag(p)
    p.add_argument("--tokens", type=positive_int, required=True, metavar="T",
                   help="tokens in the batch, s*b (required)")
    _add_sp_flag(p)
    p.add_argument("--measure", action="store_true",
                   help="also measure the bytes one decoder layer saves for backward on rank 0 (default: off)")
    _common(p)
    _add_moe_flag(p)

    p = sub.add_parser("onpolicy", help="sglang samples, Megatron trains a step, the weights are refit into the "
                                        "running engine in memory; their log-probabilities compared every iteration")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="Hugging Face checkpoint (default: the embedded tiny Qwen3 checkpoint)")
    p.add_argument("--tp", type=positive_int, default=2, metavar="N", help="trainer tensor-parallel size (default: 2)")
    p.add_argument("--server-tp", type=positive_int, default=None, metavar="N",
                   help="the sglang engine's tensor-parallel size (default: --tp, the matched layout)")
    _add_sp_flag(p)
    _add_deterministic_flag(p, "so that every iteration's sglang and Megatron log-probabilities are bit-identical")
    p.add_argument("--steps", type=positive_int, default=3, metavar="K",
                   help="iterations: sample, compare, train one step, refit (default: 3)")
    p.add_argument("--bucket-mb", type=positive_int, default=512, metavar="MB",
                   help="the refit's shared-memory buckets: at most this many MiB each (a larger tensor in one of its "
                        "own); a rank whose parameters exceed one bucket streams them in two passes, holding at most "
                        "two buckets at once (default: 512)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every iteration's row (with a boolean 'bitwise') as JSON (default: none)")
    p.add_argument("--colocate", action="store_true",
                   help="release the engine's memory (sglang's release_memory_occupation) while Megatron trains, "
                        "resume the weights, refit, then resume the KV cache; on CPU the resumed weights are "
                        "overwritten with NaN first, as a real release leaves them (default: off)")
    _common(p)
    _add_moe_flag(p)
    p.add_argument("--server-moe-parallel", choices=("tp", "ep"), default=None,
                   help="the sglang engine's MoE mode (DeepSeek; another mode than --moe-parallel: the reshard "
                        "path) (default: --moe-parallel)")

    p = sub.add_parser("train", help="train with the Megatron adapter on a small built-in token stream, then export")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face checkpoint to start from (required)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new directory for the trained Hugging Face checkpoint, written atomically (required)")
    p.add_argument("--tp", type=positive_int, default=1, metavar="N", help="tensor-parallel size (default: 1)")
    _add_cp_flag(p)
    _add_sp_flag(p)
    p.add_argument("--steps", type=positive_int, default=5, metavar="K", help="optimizer steps (default: 5)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default: 0.001)")
    p.add_argument("--seq-length", type=positive_int, default=32, metavar="S", help="sequence length (default: 32)")
    p.add_argument("--micro-batch-size", type=positive_int, default=2, metavar="B",
                   help="sequences per step (default: 2)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out, or the input checkpoint itself (default: refuse)")
    _common(p)
    _add_moe_flag(p)
    return parser


def _sp(args) -> bool:
    return args.tp > 1 if args.sequence_parallel is None else args.sequence_parallel


def check_tp(tp: int, flag: str = "--tp", cp: int = 1) -> None:
    """A tp (times a cp) this machine can run: devices on an accelerator, a bounded number of CPU ranks otherwise."""
    from sp_core.mpu import platform

    if cp > 1:
        tp, flag = cp * tp, f"--cp {cp} x {flag} {tp} ="

    if platform.device_type() != "cpu":
        if tp > platform.device_count():
            raise UsageError(f"{flag} {tp} needs {tp} devices; this machine has {platform.device_count()}")
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = settings.current().max_cpu_ranks or max(8, 4 * cores)
    if tp > limit:
        raise UsageError(f"{flag} {tp} would start {tp} CPU ranks on {cores} cores; at most {limit} here "
                         f"({MAX_CPU_RANKS_ENV} raises the limit)")


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _check_parent(path: str, flag: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the directory {parent} is not writable")


def check_output_file(path: str, flag: str, inputs: Sequence[str] = (), model_dir: Optional[str] = None,
                      force: bool = False) -> None:
    """Before any work: ``path`` can be written, and would not destroy an input without --force."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; expected a file path")
    _check_parent(path, flag)
    if force:
        return
    for given in inputs:
        if os.path.exists(given) and os.path.exists(path) and os.path.samefile(given, path):
            raise UsageError(f"{flag} {path} would overwrite the input {given}; choose another path (or --force)")
    if model_dir and _inside(path, model_dir):
        raise UsageError(f"{flag} {path} is inside the checkpoint directory {model_dir} (it could overwrite or "
                         f"join the checkpoint); choose another path (or --force)")


def check_output_dir(path: str, flag: str, model_dir: Optional[str] = None, force: Optional[bool] = False) -> None:
    """``force``: the command's --force (None where the command has none: the message then names no such flag)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file; expected a directory path")
    _check_parent(path, flag)
    if force:
        return
    hint = "" if force is None else " (or --force to replace it)"
    if model_dir and (_inside(path, model_dir) or _inside(model_dir, path)):
        raise UsageError(f"{flag} {path} overlaps the input checkpoint {model_dir}; choose a new directory{hint}")
    if os.path.isdir(path) and os.listdir(path):
        raise UsageError(f"{flag} {path} is not empty; choose a new directory{hint}")


def _save_atomic(tensors: dict, path: str) -> None:
    import tempfile

    from safetensors.torch import save_file

    fd, partial = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(tensors, partial)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        os.remove(partial)
        raise


def cmd_logits(args) -> int:
    import torch

    from sp_core.app import engines
    from sp_core.mpu import platform

    check_tp(args.tp, cp=args.cp)
    check_output_file(args.out, "--out", inputs=[args.prompts], model_dir=args.model, force=args.force)
    ready = engines.prepare(args.model, args.tp, args.moe_parallel, engine=args.engine, prompts_path=args.prompts,
                            cp=args.cp)
    dtype = getattr(torch, args.dtype or ("float32" if platform.device_type() == "cpu" else "bfloat16"))
    options = {"moe_parallel": args.moe_parallel} if args.moe_parallel != "tp" else {}
    if args.deterministic:
        options["deterministic"] = True
    if args.cp > 1:
        options["cp"] = args.cp
    console.announce("logits")
    logprobs = ready.engine.logprobs(args.model, ready.prompts, args.tp, _sp(args), dtype, **options)
    engines.check_finite(logprobs)
    _save_atomic({f"logprobs.{i}": lp.float().contiguous() for i, lp in enumerate(logprobs)}, args.out)
    console.say(f"wrote {len(logprobs)} prompts' log-probabilities to {args.out}")
    return 0


def cmd_memory(args) -> int:
    import json

    from sp_core.app import engines, memory

    check_tp(args.tp, cp=args.cp)
    cfg = engines.prepare(args.model, args.tp, args.moe_parallel).config
    report = memory.report(cfg, args.tp, args.tokens, _sp(args), args.cp)
    if args.measure:
        console.announce("memory")
        report.update(memory.measure(args.model, args.tp, args.tokens, _sp(args), args.moe_parallel, args.cp))
    print(json.dumps(report, indent=2), file=console.out(), flush=True)
    return 0


def cmd_verify(args) -> int:
    from sp_core.app import verify

    for tp in args.tp or [1]:
        for cp in args.cp:
            check_tp(tp, cp=cp)
    if args.json:
        check_output_file(args.json, "--json", model_dir=args.model)
    if args.keep:
        check_output_dir(args.keep, "--keep", force=None)  # verify has no --force
    return verify.main(args)


def check_step_fits(cfg, tp: int, sp: bool, micro_batch_size: int, seq_length: int) -> None:
    """A training step that cannot fit in memory is refused before the ranks start (one line, exit 2; before:
    the allocator failed inside a rank after the model was built). The bound is a lower one -- what any step
    must hold on a rank at once, in 16-bit: every layer's input saved for backward (1/t of it with SP) and the
    logits (1/t of the vocabulary) -- so a step refused here could never run; one accepted may still need more."""
    from sp_core.mpu import platform

    tokens = micro_batch_size * seq_length
    per_token = 2 * (cfg.num_hidden_layers * cfg.hidden_size // (tp if sp else 1) + -(-cfg.vocab_size // tp))
    have, what = platform.memory_per_rank(tp)
    if tokens * per_token > have:
        raise UsageError(f"--micro-batch-size {micro_batch_size} x --seq-length {seq_length} = {tokens} tokens a "
                         f"step need at least {tokens * per_token / 2**30:.3g} GiB per rank (each layer's input and "
                         f"the logits), more than the {have / 2**30:.3g} GiB here ({what}); use a smaller "
                         f"--micro-batch-size")


def train_dtype(cfg) -> torch.dtype:
    """The dtype ``train`` trains and exports in: bfloat16 for an FP8 checkpoint (dequantised at load; Megatron's
    --bf16: bfloat16 parameters, float32 main weights in the optimizer), as its publishers train it; float32
    otherwise."""
    import torch

    return torch.bfloat16 if cfg.fp8 is not None else torch.float32


def cmd_train(args) -> int:
    from sp_core.app import engines

    check_tp(args.tp, cp=args.cp)
    check_output_dir(args.out, "--out", model_dir=args.model, force=args.force)
    ready = engines.prepare(args.model, args.tp, args.moe_parallel, engine="megatron", cp=args.cp)
    engine, cfg = ready.engine, ready.config
    engine.check_available()
    if args.seq_length > cfg.max_position_embeddings:
        raise UsageError(f"--seq-length {args.seq_length} is longer than the model's context "
                         f"({cfg.max_position_embeddings}, max_position_embeddings)")
    sp = _sp(args)
    split = 2 * args.cp * (args.tp if sp else 1)
    if args.cp > 1 and args.seq_length % split:
        raise UsageError(f"--seq-length {args.seq_length} does not split over --cp {args.cp}: Megatron's context "
                         f"parallelism needs it divisible by 2 x cp{' x tp (sequence parallel)' if sp else ''} = {split}")
    check_step_fits(cfg, args.tp, sp, args.micro_batch_size, args.seq_length)
    dtype = train_dtype(cfg)
    console.announce("train")
    cp = f" | cp {args.cp}" if args.cp > 1 else ""
    console.say(f"sp-core train: {args.model} | tp {args.tp}{cp} | sequence parallel {'on' if sp else 'off'} | "
                f"{args.steps} steps of {args.micro_batch_size} x {args.seq_length} tokens | {str(dtype)[6:]}"
                + (" (FP8 checkpoint, dequantised at load)" if cfg.fp8 is not None else ""))
    result = engine.train_steps(args.model, args.tp, sp, args.steps, out_dir=args.out, progress=True, lr=args.lr,
                                seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                                moe_parallel=args.moe_parallel, dtype=dtype,
                                **({"cp": args.cp} if args.cp > 1 else {}))
    console.say(f"sp-core train: final loss {result['losses'][-1]:.6f}; exported to {args.out}")
    return 0


def cmd_onpolicy(args) -> int:
    from sp_core.app import onpolicy

    check_tp(args.tp)
    if args.server_tp:
        check_tp(args.server_tp, "--server-tp")
    if args.json:
        check_output_file(args.json, "--json", model_dir=args.model)
    return onpolicy.main(args)


COMMANDS = {"logits": cmd_logits, "memory": cmd_memory, "verify": cmd_verify, "onpolicy": cmd_onpolicy,
            "train": cmd_train}


class _Terminated(BaseException):
    """SIGTERM (kill, timeout, Slurm): unwind so that the ranks are stopped."""


def _on_sigterm(signum, frame):
    interrupts.stop_all()  # helper processes that cannot answer now (an engine host): killed at once
    raise _Terminated()


def _on_sigint(signum, frame):
    interrupts.stop_all()
    raise KeyboardInterrupt()


def _run(args) -> int:
    from sp_core.procs.launch import RankFailed

    name = f"sp-core {args.command}"

    def fail(code: int, message: str) -> int:
        console.say(f"{name}: error: {message}")
        return code

    try:
        return COMMANDS[args.command](args)
    except (ModelError, UsageError) as err:
        return fail(EXIT_USAGE, str(err))
    except EngineUnavailable as err:
        return fail(EXIT_UNAVAILABLE, str(err))
    except NonFiniteError as err:
        return fail(EXIT_NONFINITE, str(err))
    except RankFailed as err:
        if err.error_type in _EXIT_BY_ERROR:
            return fail(_EXIT_BY_ERROR[err.error_type], err.error_message.splitlines()[0])
        if err.details:
            print(err.details, file=sys.stderr, flush=True)  # the log, unless --verbose
            where = f" (traceback in {console.log_path()})" if console.log_path() else ""
            return fail(EXIT_RANK, f"rank {err.rank} failed: {err.error_type}: "
                                   f"{(err.error_message.splitlines() or [''])[0][:300]}{where}")
        return fail(EXIT_RANK, str(err))
    except KeyboardInterrupt:
        return fail(EXIT_SIGINT, "interrupted")
    except _Terminated:
        return fail(EXIT_SIGTERM, "terminated (SIGTERM); ranks stopped")
    except Exception as err:  # noqa: BLE001 - a bug: one line here, the traceback in the log
        traceback.print_exc()
        where = f"; traceback in {console.log_path()}" if console.log_path() else ""
        return fail(EXIT_FAIL, f"unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                               f"{where}")


def _check_environment() -> None:
    """The SP_CORE_* settings, read again for this command and checked before anything uses them (one line,
    UsageError): a typo is bad input (exit 2), not an unexpected error inside a rank or an engine."""
    try:
        settings.reread()
    except settings.SettingError as err:
        raise UsageError(str(err)) from None


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_environment()
    except UsageError as err:
        print(f"sp-core {args.command}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    previous = {}
    try:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread
        pass
    try:
        with console.quiet(args.command, args.verbose):
            code = _run(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if argv is None and code in (EXIT_SIGINT, EXIT_SIGTERM):  # the program itself (not a caller's main([...]))
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """After an interruption: the exit hooks (helper processes reaped, files closed), then the exit itself,
    without the interpreter's teardown of its modules (seconds with torch loaded, on a busy machine)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
