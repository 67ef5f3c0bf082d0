"""`sp-core verify`: a reduced matrix passes; a disagreeing engine fails it; a missing framework is a row."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from sp_core import verify
from sp_core.cli import main
from sp_core.tiny import make_checkpoint


def test_reduced_matrix_passes(tmp_path, capsys):
    report = tmp_path / "report.json"
    code = main(["verify", "--tp", "1,2", "--engines", "core,megatron", "--no-round-trip", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads(report.read_text())["rows"]
    # Qwen2, Qwen3: 2 engines x (tp 1, tp 2 SP off, tp 2 SP on); DeepSeek V2, V2-Lite, V3: the core's 3
    # and tp 2 SP on with expert parallelism, plus one row each saying megatron does not run them yet
    ran = [r for r in rows if not r["status"].startswith("unavailable")]
    assert len(ran) == 24 and all(r["status"] == "ok" for r in ran), rows
    assert all(r["vs_reference"] <= 1e-4 and r["tokens_equal"] for r in ran)
    assert sorted(r["model"] for r in rows if r not in ran) == ["deepseek-v2", "deepseek-v2-lite", "deepseek-v3"]
    assert "PASS: all 24 rows within tolerance" in out and "megatron" in out


def test_disagreeing_engine_fails(tmp_path, monkeypatch, capsys):
    """The checkpoint's weights change after transformers' reference was taken: every row must fail."""
    ckpt = make_checkpoint("qwen3", str(tmp_path / "qwen3"))
    take_reference = verify.reference_logprobs

    def reference_then_tamper(model_dir, prompts):
        ref = take_reference(model_dir, prompts)
        path = os.path.join(model_dir, "model.safetensors")
        weights = load_file(path)
        weights["model.layers.0.mlp.down_proj.weight"] += 0.05 * torch.randn_like(
            weights["model.layers.0.mlp.down_proj.weight"])
        save_file(weights, path, metadata={"format": "pt"})
        return ref

    monkeypatch.setattr(verify, "reference_logprobs", reference_then_tamper)
    code = main(["verify", "--model", ckpt, "--tp", "1,2", "--engines", "core"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL: 3 of 3 rows out of tolerance" in out


def test_missing_frameworks_are_rows_not_tracebacks(tmp_path):
    hidden = tmp_path / "hidden"
    for name in ("megatron", "sglang"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "sp_core.cli", "verify", "--tp", "1", "--engines",
                           "core,megatron,sglang"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any("megatron" in line and "unavailable: engine 'megatron' needs a framework that is not installed" in line for line in lines)
    assert any("sglang" in line and "unavailable: sglang does not import here" in line for line in lines)
    assert "round-trip" in proc.stdout and "not run" in proc.stdout
