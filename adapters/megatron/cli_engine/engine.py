"""The megatron engine of `sp-core logits` / `verify` / `train`: ranks started here, groups made by
megatron.core.parallel_state (the adapter only binds them), the model built through the adapter."""
from __future__ import annotations

from typing import List

import torch

from sp_core.procs.launch import add_preload, progress, run_ranks

add_preload("megatron.core.parallel_state")  # ~3 s of imports once in the fork server, not per rank
for _module in ("sp_core_megatron.model", "sp_core_megatron.config", __name__):  # what every rank builds with
    add_preload(_module)


def check_available() -> None:
    from sp_core.app.engines import EngineUnavailable

    try:
        import megatron.core  # noqa: F401
    except ImportError as err:
        raise EngineUnavailable(f"megatron-core is not installed or does not import ({err}); "
                                f"pip install 'sp-core[megatron]'") from None


def _init_megatron(tp: int, moe_parallel: str = "tp", cp: int = 1) -> None:
    """Megatron's groups (context_parallel_size ``cp``); with the core's expert parallelism, Megatron's
    expert-parallel group is the TP group (expert_model_parallel_size = tp, expert_tensor_parallel_size = 1)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        experts = dict(expert_model_parallel_size=tp, expert_tensor_parallel_size=1) if moe_parallel == "ep" else {}
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, **experts)


def build_model(model_dir: str, tp: int, sequence_parallel: bool, dtype: torch.dtype = torch.float32,
                moe_parallel: str = "tp", deterministic: bool = False, cp: int = 1, **config_overrides):
    """An SPCoreGPTModel on this rank's device, initialised from ``model_dir``; ``deterministic``:
    Megatron's ``deterministic_mode``; ``cp``: its context_parallel_size."""
    from sp_core.mpu import platform
    from sp_core_megatron.config import transformer_config_from_hf
    from sp_core_megatron.model import SPCoreGPTModel

    _init_megatron(tp, moe_parallel, cp)
    config = transformer_config_from_hf(model_dir, tp, sequence_parallel, params_dtype=dtype,
                                        moe_parallel=moe_parallel, deterministic_mode=deterministic,
                                        context_parallel_size=cp, **config_overrides)
    with torch.device(platform.current_device()):
        return SPCoreGPTModel(config)


@torch.no_grad()
def model_logprobs(model, prompts) -> List[torch.Tensor]:
    """log_softmax at every position of every prompt, one Megatron batch (b = 1) per prompt. Under context
    parallelism each prompt is padded at its end to a multiple of 2·cp (x t with SP: what Megatron's split
    needs), split by ``get_batch_on_this_cp_rank``, and the CP ranks' logits gathered back in order."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from sp_core.layers import gather_vocab
    from sp_core.mpu import collectives

    vocab, p = model.language_model.config.vocab_size, model.parallel
    device = next(model.parameters()).device
    multiple = 2 * p.cp_size * (p.size if model.config.sequence_parallel else 1)
    out = []
    for prompt in prompts:
        length = -(-len(prompt) // multiple) * multiple if p.cp_size > 1 else len(prompt)
        ids = torch.tensor([prompt + [0] * (length - len(prompt))], device=device)
        batch = get_batch_on_this_cp_rank({"tokens": ids, "position_ids": torch.arange(length, device=device)[None]})
        logits = gather_vocab(model(batch["tokens"], batch["position_ids"], None)[0], vocab, p)  # [s/cp, V]
        if p.cp_size > 1:  # every CP rank's chunks, back in sequence order
            order = get_batch_on_this_cp_rank({"i": torch.arange(length, device=device)[None]}, p.cp_group)["i"][0]
            every = collectives.all_gather(p.cp, logits)
            orders = collectives.all_gather(p.cp, order)
            logits = torch.empty_like(every).index_copy_(0, orders, every)
        out.append(torch.log_softmax(logits[: len(prompt)].float(), -1).cpu())
    return out


def _logprobs_rank(model_dir, prompts, tp, sequence_parallel, dtype, moe_parallel="tp", deterministic=False, cp=1):
    model = build_model(model_dir, tp, sequence_parallel, dtype, moe_parallel, deterministic, cp).eval()
    return model_logprobs(model, prompts)


def logprobs(model_dir: str, prompts, tp: int, sequence_parallel: bool, dtype: torch.dtype,
             moe_parallel: str = "tp", deterministic: bool = False, cp: int = 1) -> List[torch.Tensor]:
    """On cp x tp ranks (Megatron's context_parallel_size ``cp``)."""
    check_available()
    return run_ranks(cp * tp, _logprobs_rank, model_dir, prompts, tp, sequence_parallel, dtype, moe_parallel,
                     deterministic, cp, sequence_parallel=sequence_parallel, tp=tp, cp=cp)[0]


def clip_grad_default() -> float:
    """Megatron's default gradient clipping (1.0); its clip helper asserts CUDA tensors, so 0 on CPU."""
    from sp_core.mpu import platform

    return 1.0 if platform.device_type() != "cpu" else 0.0


def _train_rank(model_dir, tp, sequence_parallel, steps, out_dir, prompts, settings, capture_grads):
    from sp_core_megatron.cli_engine import cpu_training, training
    from sp_core_megatron.export import export_hf_checkpoint

    cpu_training.enable()  # megatron-core's CUDA assumptions, redirected in this rank on a CPU machine
    model = build_model(model_dir, tp, sequence_parallel, settings.get("dtype", torch.float32),
                        settings.get("moe_parallel", "tp"), settings.get("deterministic", False),
                        settings.get("cp", 1), **settings.get("config", {}))
    log = progress if settings.get("progress") and model.parallel.rank == 0 and model.parallel.cp_rank == 0 else None
    ddp, losses, grads0 = training.train(model, steps, seq_length=settings.get("seq_length", 32),
                                         micro_batch_size=settings.get("micro_batch_size", 2),
                                         lr=settings.get("lr", 1e-3), clip_grad=clip_grad_default(), log=log,
                                         capture_step0_grads=capture_grads)
    model.eval()
    result = {"losses": losses, "grads0": grads0}
    if prompts:
        result["logprobs"] = model_logprobs(model, prompts)
    if out_dir:
        export_hf_checkpoint(model, out_dir, progress=log)
    return result


def train_steps(model_dir: str, tp: int, sequence_parallel: bool, steps: int, out_dir=None, prompts=None,
                capture_grads: bool = False, **settings) -> dict:
    """Train ``steps`` steps in Megatron on ``tp`` ranks; optionally export to ``out_dir`` (HF) and return
    the trained model's log-probabilities of ``prompts``. Returns rank 0's {losses, grads0, logprobs}."""
    from sp_core.app.engines import check_model

    check_available()
    check_model(model_dir, tp, settings.get("moe_parallel", "tp"))
    cp = settings.get("cp", 1)
    return run_ranks(cp * tp, _train_rank, model_dir, tp, sequence_parallel, steps, out_dir, prompts, settings,
                     capture_grads, sequence_parallel=sequence_parallel, tp=tp, cp=cp)[0]


def train_and_export(model_dir: str, out_dir: str, tp: int, sequence_parallel: bool, steps: int, prompts,
                     deterministic: bool = False):
    """For the round trip: train, export to ``out_dir``, return the trained model's log-probabilities
    (``deterministic``: Megatron's ``deterministic_mode``, in training and in that forward)."""
    return train_steps(model_dir, tp, sequence_parallel, steps, out_dir=out_dir, prompts=prompts,
                       deterministic=deterministic)["logprobs"]


def onpolicy(model_dir: str, engine, tp: int, sequence_parallel: bool, moe_parallel: str, deterministic: bool,
             steps: int, prompts, new_tokens: int, lr: float, bucket_bytes: int, colocate: bool = False) -> dict:
    """`sp-core onpolicy`'s trainer: ``tp`` Megatron ranks beside the running sglang ``engine`` (its handle),
    ``steps`` iterations of sample -> compare -> train -> refit (``cli_engine.onpolicy``), the engine's memory
    released around each training step with ``colocate``. Rank 0's rows."""
    from sp_core_megatron.cli_engine import onpolicy as loop

    check_available()
    return run_ranks(tp, loop.rank, model_dir, engine, tp, sequence_parallel, moe_parallel, deterministic, steps,
                     prompts, new_tokens, lr, bucket_bytes, colocate, sequence_parallel=sequence_parallel)[0]
