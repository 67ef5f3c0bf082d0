"""The public `sp-core logits` / `sp-core memory` surface: outputs, and one-line errors with exit 2."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sp_core.app.cli import main
from support.checkpoints import make_checkpoint, reference_logprobs

PROMPTS = [[3, 1, 4, 1, 5], [9]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("qwen3", str(tmp_path_factory.mktemp("cli") / "qwen3"))


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return str(path)


def test_logits_core_tp2_matches_transformers(ckpt, prompts_file, tmp_path):
    out = str(tmp_path / "out.safetensors")
    assert main(["logits", "--model", ckpt, "--prompts", prompts_file, "--out", out, "--tp", "2"]) == 0
    got = load_file(out)
    ref = reference_logprobs(ckpt, PROMPTS)
    assert sorted(got) == ["logprobs.0", "logprobs.1"]
    for i, r in enumerate(ref):
        assert got[f"logprobs.{i}"].dtype == torch.float32 and got[f"logprobs.{i}"].shape == r.shape
        assert (got[f"logprobs.{i}"] - r).abs().max() <= 1e-4


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_bad_inputs_are_one_line_exit_2(ckpt, prompts_file, tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    base = ["logits", "--out", out]

    code, line = _error(capsys, base + ["--model", str(tmp_path / "nope"), "--prompts", prompts_file])
    assert code == 2 and "no such checkpoint directory" in line

    other = tmp_path / "llama"
    shutil.copytree(ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    code, line = _error(capsys, base + ["--model", str(other), "--prompts", prompts_file])
    assert code == 2 and "unsupported architecture 'LlamaForCausalLM'" in line and "Qwen3ForCausalLM" in line

    code, line = _error(capsys, base + ["--model", ckpt, "--prompts", prompts_file, "--tp", "3"])
    assert code == 2 and "tp 3 does not divide num_attention_heads (4)" in line

    for prompts, expected in (([[1, 2], []], "prompt 1 is empty"),
                              ([[1, 101]], "token id 101 is outside the vocabulary [0, 101)"),
                              ("[[1, 2]", "not valid JSON")):
        bad = tmp_path / "bad.json"
        bad.write_text(prompts if isinstance(prompts, str) else json.dumps(prompts))
        code, line = _error(capsys, base + ["--model", ckpt, "--prompts", str(bad)])
        assert code == 2 and expected in line, line

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(weights, str(broken / "model.safetensors"))
    code, line = _error(capsys, base + ["--model", str(broken), "--prompts", prompts_file, "--tp", "2"])
    assert code == 2
    assert "missing: model.layers.1.mlp.up_proj.weight" in line and "unexpected: model.layers.0.extra.weight" in line


def test_real_command_exit_code(tmp_path, prompts_file):
    proc = subprocess.run([sys.executable, "-m", "sp_core.app.cli", "logits", "--model", str(tmp_path / "x"),
                           "--prompts", prompts_file, "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such checkpoint directory" in proc.stderr


def _memory(capsys, ckpt, tp, sp):
    flag = "--sequence-parallel" if sp else "--no-sequence-parallel"
    assert main(["memory", "--model", ckpt, "--tp", str(tp), "--tokens", "256", flag, "--measure"]) == 0
    return json.loads(capsys.readouterr().out)


def test_memory_saved_bytes_shrink_by_t(tmp_path, capsys):
    ckpt = make_checkpoint("qwen3-train", str(tmp_path / "m"))
    base = _memory(capsys, ckpt, 1, False)["saved_bytes_per_rank"]
    for tp in (2, 4):
        with_sp = _memory(capsys, ckpt, tp, True)
        assert with_sp["sequence_parallel"] and with_sp["formula"] == "sbh/t * (34 + 5as/h)"
        assert with_sp["saved_bytes_per_rank"] <= 1.05 * base / tp, (tp, with_sp["saved_bytes_per_rank"], base)
        without = _memory(capsys, ckpt, tp, False)["saved_bytes_per_rank"]
        assert without > with_sp["saved_bytes_per_rank"]
