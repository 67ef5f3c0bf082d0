"""LM-loss gradients of ragged prompts packed into one row, under the checkpoint's names (per-expert keys):
the core's, and transformers' own model's (the independent reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.mpu import platform
from sp_core.app.runtime import pack


def core_lm_gradients(model, prompts) -> dict:
    """Full gradient of every parameter of the core ``model`` after one backward of the summed loss of
    ``prompts`` packed into one row (labels rolled by one), the sequence-parallel gradients summed over TP
    and, under CP, every gradient summed over CP."""
    from sp_core.models.checkpoint import export_state_dict

    model.train()
    ids, positions, batch = pack(prompts, platform.current_device())
    model.loss(ids, positions, batch, torch.roll(ids, -1)).sum().backward()
    mpu.allreduce_sequence_parallel_grads(model.parameters(), model.parallel)
    mpu.allreduce_context_parallel_grads(model.parameters(), model.parallel)
    return export_state_dict(model, grads=True)


def transformers_lm_gradients(hf, prompts) -> dict:
    """The same gradients from transformers' model ``hf``: each prompt run alone, against the labels of all
    of them packed into one row and rolled by one. Fused experts are split into the
    checkpoint's ``experts.{e}.{gate,up,down}_proj.weight``; a parameter that got no gradient maps to None."""
    ids = torch.tensor([tok for p in prompts for tok in p])
    labels = torch.roll(ids, -1)
    hf.zero_grad(set_to_none=True)
    loss, start = 0, 0
    for p in prompts:
        logits = hf(torch.tensor([p])).logits[0]
        loss = loss + F.cross_entropy(logits, labels[start:start + len(p)], reduction="sum")
        start += len(p)
    loss.backward()
    grads = {}
    for key, param in hf.named_parameters():
        if key.endswith("mlp.experts.gate_up_proj"):  # fused in memory: [E, 2I, H] = cat(gate, up)
            for e, g in enumerate(param.grad):
                gate, up = g.chunk(2, dim=0)
                grads[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                grads[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif key.endswith("mlp.experts.down_proj"):
            for e, g in enumerate(param.grad):
                grads[key.replace("down_proj", f"{e}.down_proj.weight")] = g
        else:
            grads[key] = param.grad
    return grads


def assert_tp1_gradients_equal_transformers(core: dict, model_dir: str, prompts, label: str) -> None:
    """``core`` (``core_lm_gradients`` of the checkpoint in ``model_dir`` at t = 1) against transformers' own
    autograd on the same ``prompts``: the same keys, every gradient within 1e-5 (relative)."""
    from transformers import AutoModelForCausalLM

    from support.compare import rel

    hf_grads = transformers_lm_gradients(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), prompts)
    assert core.keys() == hf_grads.keys()
    for key, grad in core.items():
        assert rel(grad, hf_grads[key]) <= 1e-5, f"{label} t=1 vs transformers: {key}"
