"""Training the core inside Megatron's own machinery: Megatron's DDP, get_forward_backward_func(),
finalize_model_grads (sums `sequence_parallel`-tagged gradients over TP), its optimizer and
gradient clipping. Nothing of Megatron is patched here."""
from __future__ import annotations

import time
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import torch

from sp_core.layers.sharding import gather_full
from sp_core.models.checkpoint import core_to_hf


def token_stream(vocab_size: int, seq_length: int, micro_batch_size: int, device, seed: int = 1234) -> Iterator[dict]:
    """A small built-in stream: each sequence follows next = (3 * prev + 1) mod V from a random start
    (learnable, so the loss falls). Megatron's batch layout: tokens / labels / position_ids [b, s]."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab_size, (micro_batch_size, 1), generator=gen)
        seq = [start]
        for _ in range(seq_length):
            seq.append((3 * seq[-1] + 1) % vocab_size)
        seq = torch.cat(seq, dim=1).to(device)
        yield {"tokens": seq[:, :-1], "labels": seq[:, 1:],
               "position_ids": torch.arange(seq_length, device=device).expand(micro_batch_size, -1),
               "loss_mask": torch.ones(micro_batch_size, seq_length, device=device)}


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, cp_group=None):
    """The mean loss over the batch's tokens. Under context parallelism each CP rank holds part of every
    sequence: its loss sum is divided by the tokens of all CP ranks (summed over Megatron's CP group, as
    Megatron-LM's pretrain_gpt does), which Megatron's schedule then multiplies by cp and its DDP averages
    over data-parallel x CP ranks: the gradient of the whole batch's mean. The reported loss is the whole
    batch's."""
    total = (output_tensor.float() * loss_mask).sum()
    tokens = loss_mask.sum()
    if cp_group is not None:
        from megatron.core import parallel_state

        from sp_core import mpu
        from sp_core.mpu import collectives

        both = collectives.mean_over_group(mpu.default_context(), torch.stack([total.detach(), tokens.float()]),
                                           cp_group) * parallel_state.get_context_parallel_world_size()
        return total / both[1], {"lm loss": both[0] / both[1]}
    return total / tokens, {"lm loss": (total / tokens).detach()}


def forward_step(data_iterator, model):
    """Megatron's forward_step_func contract: (output_tensor, loss_func). Under context parallelism this CP
    rank's part of the batch, split by Megatron's own ``get_batch_on_this_cp_rank`` (the zig-zag)."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    cp = parallel_state.get_context_parallel_world_size()
    batch = next(data_iterator)
    if cp > 1:
        batch = get_batch_on_this_cp_rank(dict(batch))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"],
                           cp_group=parallel_state.get_context_parallel_group() if cp > 1 else None)


def wrap_for_training(model, lr: float = 1e-3, clip_grad: float = 1.0, optimizer: str = "adam",
                      distributed_optimizer: bool = False):
    """(DDP-wrapped model, optimizer), as Megatron's training loop sets them up (fp32 main weights;
    ``distributed_optimizer``: Megatron's, its state and gradients sharded over data-parallel ranks)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    # bf16: gradients accumulated and reduced in float32, as Megatron-LM's --bf16 sets (accumulate_allreduce_grads_in_fp32)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer,
                                               grad_reduce_in_fp32=config.bf16)
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer=optimizer, lr=lr, weight_decay=0.0, clip_grad=clip_grad, bf16=config.bf16,
                        params_dtype=config.params_dtype, use_distributed_optimizer=distributed_optimizer), [ddp])
    return ddp, optimizer


def data_parallel_share(stream: Iterator[dict], micro_batch_size: int) -> Iterator[dict]:
    """This data-parallel rank's rows of a stream of global batches (``micro_batch_size`` x DP rows each), as
    Megatron's sampler hands each DP rank its own part of the global batch."""
    from megatron.core import parallel_state

    first = parallel_state.get_data_parallel_rank() * micro_batch_size
    for batch in stream:
        yield {key: rows[first:first + micro_batch_size] for key, rows in batch.items()}


def full_gradients(model) -> Dict[str, torch.Tensor]:
    """Every parameter's gradient (Megatron's main_grad), gathered over TP, by Hugging Face name; routed
    experts per expert, as their MoE layers export them."""
    out = {}
    for name, module in model.language_model.named_modules():
        if hasattr(module, "export_expert_tensors"):
            for key, grad in module.export_expert_tensors(grads=True).items():
                out[f"{name}.experts.{key}"] = grad.float().clone()
    for name, param in model.language_model.named_parameters():
        if ".mlp.experts." in f".{name}":
            continue
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        for shard, full in gather_full(param, grad, model.parallel).items():
            out[core_to_hf(name, shard)] = full.float().cpu().clone()  # a snapshot: main_grad is reused
    return out


def train(model, steps: int, seq_length: int = 32, micro_batch_size: int = 2, lr: float = 1e-3,
          clip_grad: float = 1.0, log: Optional[Callable[[str], None]] = None, capture_step0_grads: bool = False,
          grad_norms: Optional[List[float]] = None, seed: int = 1234, optimizer: str = "adam",
          distributed_optimizer: bool = False):
    """Run ``steps`` optimizer steps on the built-in stream (its sequences drawn with ``seed``; each
    data-parallel rank takes its ``micro_batch_size`` rows of a global batch). Returns (DDP model, losses,
    step-0 grads); ``grad_norms``: a list that gets each step's gradient norm (Megatron's, over every
    parameter once)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sp_core.mpu import collectives, platform

    if capture_step0_grads and distributed_optimizer:
        raise ValueError("capture_step0_grads reads whole gradients; with the distributed optimizer each rank "
                         "holds only its shard of them (use distributed_optimizer=False)")
    ddp, optimizer = wrap_for_training(model, lr=lr, clip_grad=clip_grad, optimizer=optimizer,
                                       distributed_optimizer=distributed_optimizer)
    data = data_parallel_share(
        token_stream(model.language_model.config.vocab_size, seq_length,
                     micro_batch_size * parallel_state.get_data_parallel_world_size(), platform.current_device(),
                     seed=seed), micro_batch_size)
    forward_backward = get_forward_backward_func()
    losses: List[float] = []
    grads0 = None
    for step in range(steps):
        start = time.time()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(forward_step_func=forward_step, data_iterator=data, model=[ddp], num_microbatches=1,
                               seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False)
        if capture_step0_grads and step == 0:
            grads0 = full_gradients(model)
        _, grad_norm, _ = optimizer.step()
        if grad_norm is None:  # no clipping (CPU): Megatron's optimizer computes the norm only to clip
            grad_norm = optimizer.get_grad_norm()
        if grad_norms is not None:
            grad_norms.append(float(grad_norm))
        # the loss of the whole global batch, as Megatron's training log reports it (the DP ranks' mean)
        loss = float(collectives.mean_over_group(model.parallel, out[0]["lm loss"],
                                                 parallel_state.get_data_parallel_group()))
        losses.append(loss)
        if log:
            rate = seq_length * micro_batch_size / (time.time() - start)
            log(f"step {step + 1}/{steps} | loss {loss:.6f} | grad norm {float(grad_norm or 0):.4f} | "
                f"{rate:.0f} tokens/s")
    return ddp, losses, grads0
