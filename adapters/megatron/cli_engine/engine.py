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


def _init_megatron(tp: int, moe_parallel: str = "tp") -> None:
    """Megatron's groups; with the core's expert parallelism, Megatron's expert-parallel group is the TP
    group (expert_model_parallel_size = tp, expert_tensor_parallel_size = 1)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        experts = dict(expert_model_parallel_size=tp, expert_tensor_parallel_size=1) if moe_parallel == "ep" else {}
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, **experts)


def build_model(model_dir: str, tp: int, sequence_parallel: bool, dtype: torch.dtype = torch.float32,
                moe_parallel: str = "tp", deterministic: bool = False, **config_overrides):
    """An SPCoreGPTModel on this rank's device, initialised from ``model_dir``; ``deterministic``:
    Megatron's ``deterministic_mode``."""
    from sp_core.mpu import platform
    from sp_core_megatron.config import transformer_config_from_hf
    from sp_core_megatron.model import SPCoreGPTModel

    _init_megatron(tp, moe_parallel)
    config = transformer_config_from_hf(model_dir, tp, sequence_parallel, params_dtype=dtype,
                                        moe_parallel=moe_parallel, deterministic_mode=deterministic,
                                        **config_overrides)
    with torch.device(platform.current_device()):
        return SPCoreGPTModel(config)


@torch.no_grad()
def model_logprobs(model, prompts) -> List[torch.Tensor]:
    """log_softmax at every position of every prompt, one Megatron batch (b = 1) per prompt."""
    from sp_core.layers import gather_vocab

    vocab = model.language_model.config.vocab_size
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        positions = torch.arange(len(prompt), device=device).unsqueeze(0)
        logits = model(ids, positions, None)[0]  # [s, V/t]
        out.append(torch.log_softmax(gather_vocab(logits, vocab).float(), -1).cpu())
    return out


def _logprobs_rank(model_dir, prompts, tp, sequence_parallel, dtype, moe_parallel="tp", deterministic=False):
    model = build_model(model_dir, tp, sequence_parallel, dtype, moe_parallel, deterministic).eval()
    return model_logprobs(model, prompts)


def logprobs(model_dir: str, prompts, tp: int, sequence_parallel: bool, dtype: torch.dtype,
             moe_parallel: str = "tp", deterministic: bool = False) -> List[torch.Tensor]:
    check_available()
    return run_ranks(tp, _logprobs_rank, model_dir, prompts, tp, sequence_parallel, dtype, moe_parallel,
                     deterministic, sequence_parallel=sequence_parallel)[0]


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
                        **settings.get("config", {}))
    log = progress if settings.get("progress") and model.parallel.rank == 0 else None
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
    return run_ranks(tp, _train_rank, model_dir, tp, sequence_parallel, steps, out_dir, prompts, settings,
                     capture_grads, sequence_parallel=sequence_parallel)[0]


def train_and_export(model_dir: str, out_dir: str, tp: int, sequence_parallel: bool, steps: int, prompts,
                     deterministic: bool = False):
    """For the round trip: train, export to ``out_dir``, return the trained model's log-probabilities
    (``deterministic``: Megatron's ``deterministic_mode``, in training and in that forward)."""
    return train_steps(model_dir, tp, sequence_parallel, steps, out_dir=out_dir, prompts=prompts,
                       deterministic=deterministic)["logprobs"]


def onpolicy(model_dir: str, engine, tp: int, sequence_parallel: bool, moe_parallel: str, deterministic: bool,
             steps: int, prompts, new_tokens: int, lr: float, bucket_bytes: int) -> dict:
    """`sp-core onpolicy`'s trainer: ``tp`` Megatron ranks beside the running sglang ``engine`` (its handle),
    ``steps`` iterations of sample -> compare -> train -> refit (``cli_engine.onpolicy``). Rank 0's rows."""
    from sp_core_megatron.cli_engine import onpolicy as loop

    check_available()
    return run_ranks(tp, loop.rank, model_dir, engine, tp, sequence_parallel, moe_parallel, deterministic, steps,
                     prompts, new_tokens, lr, bucket_bytes, sequence_parallel=sequence_parallel)[0]
