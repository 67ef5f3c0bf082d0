"""Two models with different parallel contexts in one process (issue 29): on 2 ranks a tp-2 SP model in
training, a tp-2 SP-off deterministic model serving, and a tp-1 model training, their forwards and backwards
interleaved, each ``torch.equal`` to the same model run alone through the one-model path (the default
context, nothing else alive). Qwen3 and DeepSeek-V3 with both MoE modes.

While they interleave, the default context is a trap unlike all three (tp 2, SP on, not deterministic, the
ring async-TP form): a layer, operator or collective that read the default instead of its model's context
would shard, sum or fuse differently and break the equality; ``test_two_models_trap_is_felt`` shows that
the same runs built on the default context do differ."""
import dataclasses

import pytest
import torch

from sp_core import mpu
from sp_core.app.runtime import load_model, pack
from sp_core.app.tiny import make_checkpoint
from support.contexts import remake
from support.multirank import run_ranks

PROMPTS = [[1, 5, 9, 3, 4, 60, 2], [7], [2, 8, 60, 11, 13, 40]]
CASES = [("qwen3", "tp"), ("deepseek-v3", "tp"), ("deepseek-v3", "ep")]
ROLES = ("policy", "reference", "single")  # tp-2 SP training; tp-2 SP-off deterministic serving; tp-1 training


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_models")
    return {name: make_checkpoint(name, str(root / name)) for name in dict(CASES)}


def _contexts(default):
    return {"policy": default.replace(sequence_parallel=True),
            "reference": default.replace(sequence_parallel=False, deterministic=True),
            "single": mpu.single_rank()}


def _train_step(model, labels_of):
    ids, positions, batch = pack(PROMPTS)
    model.zero_grad()
    loss = model.loss(ids, positions, batch, labels_of(ids)).sum()
    return loss, model


def _finish(loss, model):
    loss.backward()
    mpu.allreduce_sequence_parallel_grads(model.parameters(), model.parallel)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _serve(model):
    ids, positions, batch = pack(PROMPTS)
    return model(ids, positions, batch)


def _labels(ids):
    return torch.roll(ids, -1)


def _alone(model_dir, mode, role):
    """The role's model as a one-model user runs it: its settings made the default context, built on it."""
    base = mpu.default_context()
    made = {"policy": lambda: remake(sequence_parallel=True, deterministic=False),
            "reference": lambda: remake(sequence_parallel=False, deterministic=True),
            "single": lambda: remake(group=None, sequence_parallel=False, deterministic=False)}[role]()
    try:
        torch.manual_seed(0)
        model = load_model(model_dir, moe_parallel=mode)
        assert model.parallel is made
        if role == "reference":
            return _serve(model), _serve(model)
        return _finish(*_train_step(model, _labels))
    finally:
        remake(group=base.group, sequence_parallel=base.sequence_parallel, deterministic=base.deterministic)


def _interleaved(model_dir, mode, on_default=False):
    """The three models alive at once, their steps interleaved, under a trap default context. ``on_default``:
    every model built on the trap instead of its own context (the negative control)."""
    default = mpu.default_context()
    contexts = _contexts(default)
    trap = remake(sequence_parallel=True, deterministic=False,
                  settings=dataclasses.replace(default.settings, async_tp="ring"))
    models = {}
    for role in ROLES:
        torch.manual_seed(0)
        models[role] = load_model(model_dir, moe_parallel=mode, parallel=trap if on_default else contexts[role])
    policy = _train_step(models["policy"], _labels)  # forward, backward pending
    served_first = _serve(models["reference"])
    single = _train_step(models["single"], _labels)
    policy = _finish(*policy)
    served_second = _serve(models["reference"])
    single = _finish(*single)
    return {"policy": policy, "reference": (served_first, served_second), "single": single}


def _rank(dirs):
    out = {}
    for name, mode in CASES:
        alone = {role: _alone(dirs[name], mode, role) for role in ROLES}
        out[name, mode] = (alone, _interleaved(dirs[name], mode))
    name, mode = CASES[1]
    out["control"] = (out[name, mode][0], _interleaved(dirs[name], mode, on_default=True))
    return out


@pytest.fixture(scope="module")
def runs(dirs):
    return run_ranks(2, _rank, dirs)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_two_models_interleaved_equal_each_alone(runs, case):
    for rank, out in enumerate(runs):
        alone, together = out[case]
        for role in ROLES:
            assert _equal(together[role], alone[role]), f"rank {rank} {case} {role}: interleaved != alone"
        assert _equal(together["reference"][0], together["reference"][1])  # deterministic: the same twice


def test_two_models_trap_is_felt(runs):
    """Negative control: built on the trap default, the reference and the tp-1 model no longer equal their runs
    alone (so the equality above rests on each model keeping its own context)."""
    alone, on_trap = runs[0]["control"]
    assert not _equal(on_trap["reference"], alone["reference"])
    assert not _equal(on_trap["single"], alone["single"])


def test_two_models_readme_example_runs_as_pasted(tmp_path):
    """README's "Several models in one process" example, pasted into a script and run as it says (torchrun,
    2 ranks), "Qwen3-8B/" a tiny Qwen3 checkpoint."""
    import os
    import pathlib
    import re
    import subprocess
    import sys

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Several models in one process"):readme.index("## Bit-identical training")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    make_checkpoint("qwen3", str(tmp_path / "Qwen3-8B"))
    (tmp_path / "example.py").write_text(block)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d): loss [\d.]+, reference logits \((\d+), 101\)", proc.stdout)) == \
        [("0", "6"), ("1", "6")], proc.stdout
