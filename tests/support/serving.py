"""Helpers shared by the tests that serve through the real ``sglang.Engine``: requests, the distributions
sglang returns, transformers' reference for the same prompts, and the collective log the workers write."""
from __future__ import annotations

import collections
import os

import torch


def generate(engine, prompts, **kwargs):
    """``engine.generate(input_ids=prompts, **kwargs)`` as a list (sglang returns a bare dict for one prompt)."""
    out = engine.generate(input_ids=prompts, **kwargs)
    return out if isinstance(out, list) else [out]


def distributions(meta, vocab):
    """The full-vocabulary log-probabilities sglang returned (``top_logprobs_num=vocab``), in position order:
    the input entries after the first, then the last position's. Entries are None where a position's
    hidden state came from the radix cache, so a request with ``logprob_start_len=n`` gives positions n.."""
    entries = list(meta["input_top_logprobs"][1:]) + [meta["output_top_logprobs"][0]]
    rows = torch.full((len(entries), vocab), float("nan"))
    for j, entry in enumerate(entries):
        for logprob, token_id, _ in entry:
            rows[j, int(token_id)] = float(logprob)
    assert not torch.isnan(rows).any()
    return rows


def hf_logprobs(model, prompt):
    """transformers' log-probabilities at every position of one prompt, float32 ``[len, vocab]``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)


def hf_greedy(model, prompts, new_tokens):
    """transformers' ``generate``: greedy, exactly ``new_tokens`` new tokens per prompt."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
            out.append(gen[0, len(p):].tolist())
    return out


def read_collectives(log_path, routes=("GroupCoordinator",)):
    """The "<pid> <op> <shape> <route>" lines ``sp_core.mpu`` appended to SP_CORE_COLLECTIVE_LOG since the
    last call (the log is cleared), as tuples; every one must have gone through one of ``routes``."""
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        lines = [tuple(line.split(" ")) for line in f.read().splitlines()]
    os.remove(log_path)
    seen = collections.Counter(route for (*_, route) in lines)
    assert set(seen) <= set(routes), f"collectives not through {routes}: {seen}"
    return lines
