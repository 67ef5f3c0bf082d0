"""Context parallelism composed with TP-SP in the core (float32, CPU, gloo): Qwen3 (one KV head, fewer than t),
DeepSeek V3 (MoE split over TP and expert-parallel) and V3.2 (index_topk below most prompt lengths).

Two launches: 2 ranks (cp 2 x tp 1) and 4 ranks (cp 2 x tp 2 with SP on and off, and cp 4 x tp 1 on a CP group
over all four ranks). Each computes log-probabilities (vs transformers), LM-loss gradients (vs cp 1 in this
process), V3.2's selected keys (vs transformers' own), what one layer's attention all-gathers, and the bytes
one layer saves for backward.
"""
import ast
import math

import pytest
import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.app.runtime import load_model, pack, prompt_logprobs
from sp_core.mpu import platform
from support.checkpoints import make_checkpoint, reference_logprobs
from support.compare import max_diff, rel
from support.contexts import default_with, single_process
from support.gradients import core_lm_gradients
from support.index_scores import hf_index_scores
from support.multirank import collective_log, launches_per_cp_tp

INDEX_TOPK = 3  # the tiny V3.2's
# lengths 1 to 40: shorter than 2·cp·t (1, 2, 3, 5: whole CP ranks of padding), and longer than index_topk
PROMPTS = [[(7 * i + 13 * j) % 89 + 1 for j in range(n)] for i, n in enumerate([1, 3, 5, 8, 13, 40, 2])]
MODELS = {"qwen3": ("qwen3", "tp"), "v3": ("deepseek-v3", "tp"), "v3-ep": ("deepseek-v3", "ep"),
          "v32": ("deepseek-v32", "tp")}
LAUNCHES = {2: (2, 1), 4: (2, 2)}  # world -> (cp, tp) the launch initialises
SETTINGS = {2: ["cp2-tp1"], 4: ["cp2-tp2-sp", "cp2-tp2", "cp4-tp1"]}
MEMORY_TOKENS = 96
# values per token that one layer's attention gathers over CP: Qwen3's K and V head of this rank (2 x 20);
# MLA's [kv_lat | k_pe] (16 + 8), not the 4 heads' keys and values (4 x (24 + 12) = 144); V3.2 adds its
# index key (16)
CP_GATHER_WIDTHS = {"qwen3": [40], "v3": [24], "v3-ep": [24], "v32": [16, 24]}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    made = {name: make_checkpoint(name, str(root / name)) for name in ("qwen3", "deepseek-v3", "deepseek-v32")}
    return {"models": made, "log": str(root / "collectives.log")}


def _contexts(world):
    """name -> a way to make it the default context (CP group, TP group, SP) for this launch's ranks."""
    import torch.distributed as dist

    if world == 2:  # the launch's own: cp 2 x tp 1
        return {"cp2-tp1": lambda: default_with(sequence_parallel=False)}
    everyone = dist.new_group(list(range(world)))  # every rank creates every group
    return {"cp2-tp2-sp": lambda: default_with(sequence_parallel=True),
            "cp2-tp2": lambda: default_with(sequence_parallel=False),
            "cp4-tp1": lambda: default_with(None, cp_group=everyone, sequence_parallel=False)}


def _selection(model):
    """V3.2: every layer's selected keys for PROMPTS, [total tokens, k] packed-batch rows (-1: none), put
    together from every CP rank."""
    from sp_core.mpu import collectives

    captured = []
    hooks = [layer.self_attn.indexer.register_forward_hook(lambda m, args, out: captured.append((args[3], out)))
             for layer in model.model.layers]
    try:
        prompt_logprobs(model, PROMPTS)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for batch, selected in captured:
        gathered = collectives.all_gather(model.parallel.cp, selected.contiguous())
        out.append(gathered.index_select(0, batch.gathered_row_of_token()))
    return out


def _gathered_per_layer(model, log):
    """The shapes one layer's attention forward all-gathers (cp x tp 1: every gather is over CP)."""
    ids, positions, batch = pack(PROMPTS, platform.current_device())
    cp_batch = model.context_parallel_batch(batch, ids.device)
    ids, positions = (F.pad(x[cp_batch.local_index], (0, cp_batch.rows - cp_batch.num_tokens)) for x in (ids, positions))
    layer = model.model.layers[1]
    with torch.no_grad():
        hidden = layer.input_layernorm(model.model.embed_tokens(ids))
        _, shapes = log(lambda: layer.self_attn(hidden, positions, cp_batch))
    return shapes


def _rank(dirs, cp, tp):
    from sp_core.app.memory import _measure_rank

    out = {}
    for setting, make in _contexts(cp * tp).items():
        result = out[setting] = {"logprobs": {}, "grads": {}, "saved": {}}
        for name, (checkpoint, moe) in MODELS.items():
            with make():
                model = load_model(dirs["models"][checkpoint], moe_parallel=moe)
                result["logprobs"][name] = prompt_logprobs(model, PROMPTS)
                if name == "v32":
                    result["selection"] = _selection(model)
                result["grads"][name] = core_lm_gradients(model, PROMPTS)
                if name != "v3-ep":
                    result["saved"][name] = _measure_rank(dirs["models"][checkpoint], MEMORY_TOKENS)
                if setting.endswith("tp1"):
                    with collective_log(f"{dirs['log']}.{torch.distributed.get_rank()}") as log:  # one file a rank
                        result.setdefault("gathered", {})[name] = _gathered_per_layer(load_model(
                            dirs["models"][checkpoint], moe_parallel=moe), log)
    return out


@pytest.fixture(scope="module")
def results(dirs):
    """results(world): rank 0's ``_rank`` of the 2-rank (cp 2 x tp 1) or 4-rank (cp 2 x tp 2) launch."""
    get = launches_per_cp_tp(_rank, dirs)
    return lambda world: get(*LAUNCHES[world])


@pytest.fixture(scope="module")
def refs(dirs):
    return {name: reference_logprobs(dirs["models"][checkpoint], PROMPTS)
            for name, (checkpoint, _) in MODELS.items() if name != "v3-ep"}


@pytest.fixture(scope="module")
def cp1(dirs):
    """cp 1 x tp 1 in this process: LM-loss gradients and saved bytes of each model."""
    from sp_core.app.memory import _measure_rank

    out = {"grads": {}, "saved": {}}
    for name, (checkpoint, moe) in MODELS.items():
        with single_process():
            out["grads"][name] = core_lm_gradients(load_model(dirs["models"][checkpoint], moe_parallel=moe), PROMPTS)
            out["saved"][name] = _measure_rank(dirs["models"][checkpoint], MEMORY_TOKENS)
    return out


def _all(results):
    for world, settings in SETTINGS.items():
        for setting in settings:
            yield setting, results(world)[setting]


def test_logprobs_equal_transformers(results, refs):
    for setting, got in _all(results):
        for name, logprobs in got["logprobs"].items():
            ref = refs[name.replace("-ep", "")]
            assert [x.shape for x in logprobs] == [x.shape for x in ref], (setting, name)  # no padding rows
            diff = max_diff(logprobs, ref)
            assert diff <= 1e-4, f"{setting} {name}: |d logprob| {diff}"


def test_gradients_equal_cp1(results, cp1):
    for setting, got in _all(results):
        for name, grads in got["grads"].items():
            base = cp1["grads"][name]
            assert grads.keys() == base.keys(), (setting, name)
            for key, ref in base.items():
                if ref is None:
                    assert grads[key] is None, (setting, name, key)
                    continue
                assert rel(grads[key], ref) <= 1e-5, f"{setting} {name}: gradient of {key}"


def test_indexer_selects_transformers_keys(results, dirs):
    """Under CP every row's selected keys (packed-batch rows, from its CP rank's scores against every CP rank's
    keys) are transformers' top-k among its visible keys; no row's k-th and (k+1)-th key are a near-tie."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(dirs["models"]["deepseek-v32"], dtype=torch.float32)
    captured = []
    hooks = [layer.self_attn.indexer.register_forward_hook(lambda m, args, out: captured.append((m, args, out)))
             for layer in hf.model.layers]
    expected, gaps, offset = [[] for _ in hf.model.layers], [], 0
    try:
        with torch.no_grad():
            for p in PROMPTS:
                captured.clear()
                hf(torch.tensor([p]))
                for layer, (indexer, args, selected) in enumerate(captured):
                    cos, sin = args[2]
                    scores = hf_index_scores(indexer, args[0][0], args[1][0], cos[0], sin[0])
                    for row in range(len(p)):
                        top = set(scores[row].topk(min(INDEX_TOPK, len(p))).indices.tolist())
                        assert top == set(selected[0, row].tolist())
                        expected[layer].append({offset + key for key in top if key <= row})
                        if row >= INDEX_TOPK:
                            ordered = scores[row, : row + 1].sort(descending=True).values
                            gaps.append((ordered[INDEX_TOPK - 1] - ordered[INDEX_TOPK]).item())
                offset += len(p)
    finally:
        for h in hooks:
            h.remove()
    assert min(gaps) >= 1e-4, f"index-score margin {min(gaps):.3e}"
    for setting, got in _all(results):
        assert len(got["selection"]) == len(hf.model.layers)
        for layer, selection in enumerate(got["selection"]):
            assert [set(row[row >= 0].tolist()) for row in selection] == expected[layer], (setting, layer)


def test_cp_gathers_the_latent_not_the_heads(results):
    """Per layer, the attention gathers over CP only what keys and values come from: its rows x (MLA's
    kv_lora + rope; V3.2's index key; Qwen3's K/V heads of this rank)."""
    for setting in ("cp2-tp1", "cp4-tp1"):
        got = results(2 if setting == "cp2-tp1" else 4)[setting]["gathered"]
        for name, shapes in got.items():
            widths = sorted(math.prod(ast.literal_eval(shape)[1:]) for shape in shapes)
            assert widths == CP_GATHER_WIDTHS[name], (setting, name, shapes)


def test_saved_bytes_shrink_by_cp_times_t(results, cp1):
    """Bytes one layer saves for backward per rank at cp x tp (SP on where t > 1) <= 1.05 x (cp 1 x tp 1 bytes) /
    (cp t), as the SP tests bound t alone (Qwen3's one KV head is replicated over TP): the CP gather is not
    saved (the attention over it is recomputed in backward)."""
    for setting, cp, t in (("cp2-tp1", 2, 1), ("cp2-tp2-sp", 2, 2), ("cp4-tp1", 4, 1)):
        got = results(2 if setting == "cp2-tp1" else 4)[setting]["saved"]
        for name, by_type in got.items():
            for kind, saved in by_type.items():
                base = cp1["saved"][name][kind]
                print(f"{setting} {name} {kind}: {saved} bytes saved per rank, cp 1 x tp 1 {base} ({base / saved:.2f}x)")
                assert saved <= 1.05 * base / (cp * t), (setting, name, kind)


def test_cli_logits_memory_and_verify_rows(dirs, refs, tmp_path, capsys):
    """`sp-core logits --cp 2` (transformers' log-probabilities, no padding rows), `memory --measure --cp 2 --tp 2`
    (the CP keys; per rank <= 1/(cp t) of tp 1's) and `verify --cp 1,2` (cp 2 rows in the core engine)."""
    import json

    from safetensors.torch import load_file

    from sp_core.app.cli import main

    qwen3 = dirs["models"]["qwen3"]
    prompts, out = tmp_path / "prompts.json", tmp_path / "out.safetensors"
    prompts.write_text(json.dumps(PROMPTS))
    assert main(["logits", "--model", qwen3, "--prompts", str(prompts), "--out", str(out), "--cp", "2"]) == 0
    got = load_file(str(out))
    assert max_diff([got[f"logprobs.{i}"] for i in range(len(PROMPTS))], refs["qwen3"]) <= 1e-4
    capsys.readouterr()
    v3 = dirs["models"]["deepseek-v3"]
    reports = {}
    for flags in (["--tp", "1", "--no-sequence-parallel"], ["--tp", "2", "--cp", "2"]):
        assert main(["memory", "--model", v3, "--tokens", str(MEMORY_TOKENS), "--measure"] + flags) == 0
        reports[flags[1]] = json.loads(capsys.readouterr().out)
    cp = reports["2"]
    assert cp["cp"] == 2 and cp["cp_gathered_values_per_token"] == 24  # kv_lora + rope
    assert cp["cp_gather_bytes_per_layer"] == 2 * MEMORY_TOKENS * 24
    assert cp["saved_bytes_per_rank"] <= reports["1"]["saved_bytes_per_rank"] / 4
    report = tmp_path / "verify.json"
    assert main(["verify", "--model", qwen3, "--tp", "1", "--cp", "1,2", "--engines", "core", "--no-round-trip",
                 "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [(r["cp"], r["tp"], r["status"]) for r in rows] == [(1, 1, "ok"), (2, 1, "ok")]
    assert "cp2 tp1" in capsys.readouterr().out


def test_readme_example_runs_as_pasted(dirs, tmp_path):
    """README's "Context parallelism" example, pasted into a script and run as it says (torchrun, 4 ranks)."""
    import os
    import pathlib
    import re
    import subprocess
    import sys

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("## Context parallelism")
    section = readme[start:readme.index("\n## ", start)]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (tmp_path / "cp_example.py").write_text(block)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           "cp_example.py", dirs["models"]["qwen3"]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r"\(11, 101\) [\d.]+\n", proc.stdout), proc.stdout
