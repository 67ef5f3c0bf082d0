"""The trainer ranks of `sp-core onpolicy`: Megatron (SPCoreGPTModel, Megatron's DDP and optimizer) beside a
running sglang engine, which TP rank 0 drives through its handle. Each iteration:

1. sglang samples a completion of each prompt (temperature 1; the engine's ``random_seed`` fixes the draws) and then
   scores the whole sequences (its log-probability of every completion token, one prefill);
2. Megatron computes its own log-probabilities of the same tokens (same weights: the last refit's);
3. one training step on them: the negative log-likelihood of the sampled completions (policy gradient with
   reward 1), through Megatron's forward_backward_func and optimizer;
4. refit: the new weights into the engine in memory (``sp_core_megatron.refit``), weight version = iteration.

With ``colocate``, the engine's memory is released (sglang's ``release_memory_occupation``) between 1 and 3 and
resumed around 4 (``sp_core_sglang.colocate``: weights, refit, then KV cache and CUDA graphs).
A refused refit stops the loop (``stopped``: one line): with ``colocate`` the engine then holds no valid weights.

Before the first iteration a refit to version 0 makes the engine serve exactly the trainer's weights (whatever
it was started from); after the last iteration one more sample-and-score checks the last refit. Rank 0
returns the rows.
"""
from __future__ import annotations

from typing import List

import torch

from sp_core.mpu import collectives
from sp_core.procs.launch import progress

TEMPERATURE = 1.0


def sample_and_score(engine, prompts: List[List[int]], new_tokens: int):
    """(sequences, sglang's log-probability of each completion token, the weight version that served them)."""
    outs = engine.generate(input_ids=prompts, sampling_params={"temperature": TEMPERATURE, "max_new_tokens": new_tokens,
                                                               "ignore_eos": True})
    sequences = [list(p) + list(o["output_ids"]) for p, o in zip(prompts, outs)]
    versions = {o["meta_info"].get("weight_version") for o in outs}
    scored = engine.generate(input_ids=sequences, sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                             return_logprob=True, logprob_start_len=0)
    versions |= {o["meta_info"].get("weight_version") for o in scored}
    served = [torch.tensor([entry[0] for entry in o["meta_info"]["input_token_logprobs"][len(p):]], dtype=torch.float32)
              for p, o in zip(prompts, scored)]
    return sequences, served, ",".join(sorted(str(v) for v in versions))


def completion_logprobs(model, sequences, prompt_lengths) -> List[torch.Tensor]:
    """Megatron's log-probability of each completion token (row p of the log-softmax predicts token p + 1)."""
    from sp_core_megatron.cli_engine.engine import model_logprobs

    rows = model_logprobs(model, sequences)
    return [r[torch.arange(n - 1, len(s) - 1), torch.tensor(s[n:])] for r, s, n in zip(rows, sequences, prompt_lengths)]


def train_step(ddp, optimizer, sequences, prompt_lengths) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sp_core.mpu import platform
    from sp_core_megatron.cli_engine import training

    device = platform.current_device()
    batches = []
    for seq, n in zip(sequences, prompt_lengths):
        ids = torch.tensor(seq, device=device)
        mask = torch.zeros(len(seq) - 1, device=device)
        mask[n - 1:] = 1.0  # the targets that are completion tokens
        batches.append({"tokens": ids[:-1][None], "labels": ids[1:][None], "loss_mask": mask[None],
                        "position_ids": torch.arange(len(seq) - 1, device=device)[None]})
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(forward_step_func=training.forward_step, data_iterator=iter(batches),
                                      model=[ddp], num_microbatches=len(batches),
                                      seq_length=max(len(s) for s in sequences) - 1, micro_batch_size=1,
                                      forward_only=False)
    optimizer.step()
    return float(sum(float(o["lm loss"]) for o in out) / max(len(out), 1))


def _compare(served, trained):
    delta = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(served, trained))
    bitwise = all(torch.equal(a, b) for a, b in zip(served, trained))
    return delta, bitwise


def rank(model_dir, engine, tp, sequence_parallel, moe_parallel, deterministic, steps, prompts, new_tokens, lr,
         bucket_bytes, colocate=False):
    from sp_core_megatron.cli_engine import cpu_training, training
    from sp_core_megatron.cli_engine.engine import build_model, clip_grad_default
    from sp_core_megatron.refit import core_model, refit
    from sp_core_sglang import colocate as colocation

    cpu_training.enable()
    model = build_model(model_dir, tp, sequence_parallel, torch.float32, moe_parallel, deterministic)
    ddp, optimizer = training.wrap_for_training(model, lr=lr, clip_grad=clip_grad_default())
    parallel = core_model(model).parallel
    first = parallel.rank == 0
    lengths = [len(p) for p in prompts]
    start = refit(model, engine, "0", bucket_bytes)
    if not start.success:
        return {"rows": [], "after_last_refit": None, "stopped": f"the refit to version 0 was refused: {start.message}"}
    rows, checks, stopped = [], [], ""
    for it in range(steps + 1):
        sample = sample_and_score(engine, prompts, new_tokens) if first else None
        sequences, served, version = collectives.broadcast_object(parallel, sample)
        model.eval()
        delta, bitwise = _compare(served, completion_logprobs(model, sequences, lengths))
        checks.append({"weight_version": version, "max_abs_delta": delta, "bitwise": bitwise})
        if it == steps:
            break
        if colocate and first:
            colocation.release(engine)
        model.train()
        loss = train_step(ddp, optimizer, sequences, lengths)
        if colocate and first:
            colocation.resume_weights(engine)
        result = refit(model, engine, str(it + 1), bucket_bytes)
        if not result.success:
            stopped = (f"iteration {it + 1}: the refit was refused ({result.message}); "
                       + ("the engine's weights were released before it, so it holds no valid weights" if colocate
                          else f"the engine still serves version {version}"))
            break
        if colocate and first:
            colocation.resume_cache(engine)
        per_rank = collectives.gather_objects_to_first(parallel, (result.bytes_moved, result.full_tensors,
                                                                  result.seconds, result.buckets, result.peak_bytes))
        if first:
            rows.append({"iteration": it + 1, "weight_version": version, "loss": loss,
                         "refit_seconds": max(r[2] for r in per_rank), "refit_version": result.weight_version,
                         "bytes_per_rank": [r[0] for r in per_rank],
                         "full_tensors": sum(r[1] for r in per_rank),
                         "buckets_per_rank": [r[3] for r in per_rank], "refit_passes": result.passes,
                         "peak_shm_per_rank": [r[4] for r in per_rank],
                         "max_abs_delta": delta, "bitwise": bitwise})
            progress(f"iteration {it + 1}/{steps} | served version {version} | loss {loss:.6f} | max |d logprob| "
                     f"{delta:.3g} ({'bitwise' if bitwise else 'not bitwise'}) | refit {result.seconds:.2f} s, "
                     f"{result.bytes_moved / 2**20:.2f} MiB per rank -> version {result.weight_version}")
    if not first:
        return None
    for row, after in zip(rows, checks[1:]):
        row["version_advanced"] = after["weight_version"] == row["refit_version"]
    return {"rows": rows, "after_last_refit": None if stopped else checks[-1], "stopped": stopped}
