"""The ``sp-core`` command: logits, verify, memory (public surface, DESIGN.md), train and bench."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from sp_core.models import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class UsageError(ValueError):
    """Bad input: one line on stderr, exit 2."""


def _add_sp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequence-parallel", dest="sequence_parallel", action=argparse.BooleanOptionalAction,
                   default=None, help="SP on or off (default: on when tp > 1)")


def _add_moe_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moe-parallel", choices=("tp", "ep"), default="tp",
                   help="MoE layers (DeepSeek): tp = every rank holds 1/t of every expert (default); "
                        "ep = expert parallelism over the TP group, n_routed_experts/t whole experts per rank")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sp-core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("logits", help="log-probabilities of prompts at every position, to a safetensors file")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--prompts", required=True, help="JSON list of lists of token ids")
    p.add_argument("--out", required=True, help="output .safetensors (logprobs.{i}: float32 [len_i, vocab])")
    p.add_argument("--engine", default="core", help="core (default), megatron or sglang")
    p.add_argument("--tp", type=int, default=1)
    _add_sp_flag(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on GPU")
    _add_moe_flag(p)

    p = sub.add_parser("verify", help="compare every engine x tp x SP setting with transformers")
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded tiny checkpoints)")
    p.add_argument("--tp", default=None, help="comma-separated tp sizes (default 1,2,4)")
    p.add_argument("--engines", default="core,megatron,sglang")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--no-round-trip", dest="round_trip", action="store_false",
                   help="skip the train-in-Megatron -> export -> serve-in-sglang round trip")

    p = sub.add_parser("memory", help="the paper's activation-memory formulas, and bytes saved for backward")
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    _add_sp_flag(p)
    p.add_argument("--measure", action="store_true", help="measure bytes saved for backward by one decoder layer")
    _add_moe_flag(p)

    p = sub.add_parser("train", help="train with the Megatron adapter on a small built-in token stream")
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    _add_sp_flag(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", required=True, help="export the trained weights to this HF directory")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=2)
    return parser


def _sp(args) -> bool:
    return args.tp > 1 if args.sequence_parallel is None else args.sequence_parallel


def _check_tp(tp: int) -> None:
    from sp_core.mpu import platform

    if tp < 1:
        raise UsageError(f"--tp must be a positive integer, got {tp}")
    if platform.device_type() != "cpu" and tp > platform.device_count():
        raise UsageError(f"--tp {tp} needs {tp} devices; this machine has {platform.device_count()}")


def cmd_logits(args) -> int:
    from safetensors.torch import save_file

    from sp_core import engines

    _check_tp(args.tp)
    cfg = engines.check_model(args.model, args.tp, args.moe_parallel)
    engines.check_engine(args.engine, cfg, args.moe_parallel)
    prompts = engines.read_prompts(args.prompts, cfg.vocab_size)
    from sp_core.mpu import platform

    dtype = DTYPES[args.dtype or ("float32" if platform.device_type() == "cpu" else "bfloat16")]
    moe = {"moe_parallel": args.moe_parallel} if args.moe_parallel != "tp" else {}
    logprobs = engines.get(args.engine).logprobs(args.model, prompts, args.tp, _sp(args), dtype, **moe)
    save_file({f"logprobs.{i}": lp.float().contiguous() for i, lp in enumerate(logprobs)}, args.out)
    print(f"wrote {len(logprobs)} prompts' log-probabilities to {args.out}", file=sys.stderr)
    return 0


def cmd_memory(args) -> int:
    from sp_core import engines, memory

    _check_tp(args.tp)
    if args.tokens < 1:
        raise UsageError(f"--tokens must be a positive integer, got {args.tokens}")
    cfg = engines.check_model(args.model, args.tp, args.moe_parallel)
    report = memory.report(cfg, args.tp, args.tokens, _sp(args))
    if args.measure:
        report.update(memory.measure(args.model, args.tp, args.tokens, _sp(args), args.moe_parallel))
    print(json.dumps(report, indent=2))
    return 0


def cmd_verify(args) -> int:
    from sp_core import verify

    return verify.main(args)


def cmd_train(args) -> int:
    from sp_core import engines

    engines.check_engine("megatron", engines.check_model(args.model, max(args.tp, 1)))
    return engines.get("megatron").train(args)


COMMANDS = {"logits": cmd_logits, "memory": cmd_memory, "verify": cmd_verify, "train": cmd_train}


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from sp_core.engines import EngineUnavailable
    from sp_core.mpu.launch import RankFailed

    try:
        return COMMANDS[args.command](args)
    except (ModelError, UsageError, EngineUnavailable) as err:
        print(f"sp-core {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RankFailed as err:
        if err.error_type in ("ModelError", "UsageError", "EngineUnavailable"):
            print(f"sp-core {args.command}: error: {err.error_message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
