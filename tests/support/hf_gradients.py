"""Reference gradients from transformers' own model, under the checkpoint's per-expert names."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def packed_lm_gradients(hf, prompts) -> dict:
    """Gradients of the summed cross-entropy of ``prompts``, each run alone, against the labels of all of
    them packed into one row and rolled by one (the core's ragged loss). Fused experts are split into the
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
