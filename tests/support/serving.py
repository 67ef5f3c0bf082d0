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


def prompt_logprobs_diff(engine, hf_model, prompts, vocab):
    """(sglang's full-vocabulary log-probabilities at every position of each prompt, one ragged batch; their
    max |d| against transformers' ``hf_model``)."""
    outs = generate(engine, prompts, sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                    return_logprob=True, logprob_start_len=0, top_logprobs_num=vocab)
    served = [distributions(o["meta_info"], vocab) for o in outs]
    return served, max((got - hf_logprobs(hf_model, p)).abs().max().item() for got, p in zip(served, prompts))


def assert_all_to_all_on_every_worker(log_path, tp):
    """The core's EP mode under SP: the MoE's all-to-alls ran on each of the ``tp`` workers."""
    ops = {(pid, op) for pid, op, *_ in read_collectives(log_path, ("GroupCoordinator", "torch"))}
    assert len({pid for pid, op in ops if op == "all_to_all"}) == tp, ops


def radix_hit_diff(engine, hf_model, prefix, suffix, vocab):
    """``prefix`` served first, then ``prefix + suffix`` extending over the cached prefix: (the cached tokens
    sglang reports, max |d| of the suffix positions' log-probabilities against transformers)."""
    generate(engine, [prefix], sampling_params={"temperature": 0.0, "max_new_tokens": 1})
    prompt = prefix + suffix
    second = generate(engine, [prompt], sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                      return_logprob=True, logprob_start_len=len(prefix), top_logprobs_num=vocab)[0]
    meta = second["meta_info"]
    diff = (distributions(meta, vocab) - hf_logprobs(hf_model, prompt)[len(prefix):]).abs().max().item()
    return meta["cached_tokens"], diff
