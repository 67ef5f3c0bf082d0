"""`sp-core verify`: a reduced matrix passes; an engine asked for that cannot run is exit 3; a disagreeing
engine fails it; the terminal stays quiet; no working files are left behind."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from sp_core import verify
from sp_core.cli import main
from sp_core.tiny import make_checkpoint

OUTPUT_KINDS = ("[verify ", "model ", "qwen2 ", "qwen3 ", "deepseek-", "PASS", "FAIL", "not run:", "note:",
                "sp-core verify: framework output")


def test_reduced_matrix_passes_quietly_and_leaves_nothing(tmp_path):
    """core + megatron at tp 1, 2 pass; sglang was asked for and is hidden: exit 3 with one line for it.
    The frameworks' warnings go to the log file only, and the working directory is removed."""
    hidden, tmp, logs = tmp_path / "hidden", tmp_path / "tmp", tmp_path / "logs"
    (hidden / "sglang").mkdir(parents=True)
    (hidden / "sglang" / "__init__.py").write_text("raise ImportError('sglang is hidden by the test')\n")
    tmp.mkdir()
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]),
               TMPDIR=str(tmp), SP_CORE_LOG_DIR=str(logs))
    proc = subprocess.run([sys.executable, "-m", "sp_core.cli", "verify", "--tp", "1,2", "--json", str(report)],
                          capture_output=True, text=True, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if not line.startswith(OUTPUT_KINDS)] == [], output
    assert "not run: engine sglang cannot run here:" in proc.stdout
    assert "not run: the round trip needs both megatron and sglang" in proc.stdout
    data = json.loads(report.read_text())
    rows = data["rows"]
    # Qwen2, Qwen3: 2 engines x (tp 1, tp 2 SP off, tp 2 SP on); none of sglang. DeepSeek V2, V2-Lite, V3,
    # V3.2: the core's 3 and tp 2 SP on with expert parallelism (megatron does not run them yet: one note line)
    assert len(rows) == 28 and all(r["status"] == "ok" for r in rows), rows
    assert sorted({r["model"] for r in rows if r["moe"] == "ep"}) == ["deepseek-v2", "deepseek-v2-lite", "deepseek-v3",
                                                                     "deepseek-v32"]
    assert "megatron does not run deepseek-v2, deepseek-v2-lite, deepseek-v3, deepseek-v32 yet" in proc.stdout
    assert all(r["vs_reference"] <= 1e-4 and r["tokens_equal"] for r in rows)
    assert all(r["vs_sp_off"] <= 1e-5 for r in rows if r["sp"] and r["moe"] == "tp")
    core_tp1 = [r for r in rows if r["engine"] == "core" and r["tp"] == 1]
    assert all(r["vs_core_tp1"] is None for r in core_tp1)  # no comparison with itself...
    assert all(line.split()[5] == "—" for line in proc.stdout.splitlines() if line.startswith(("qwen2 ", "qwen3 ")) and line.split()[1] == "core"
               and line.split()[2] == "1")  # ...shown as a dash, not 0
    assert data["exit_code"] == 3 and data["unavailable"] == {"sglang": data["unavailable"]["sglang"]}
    assert "PASS: all 28 rows within tolerance" in proc.stdout
    assert [p for p in os.listdir(tmp) if p.startswith("sp-core")] == []  # no litter (torch caches aside)
    log = [line for line in output.splitlines() if line.startswith("sp-core verify: framework output")]
    assert len(log) == 1 and "Apex" in open(log[0].split()[-1]).read()  # Megatron's warnings: in the log only


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
    code = main(["verify", "--model", ckpt, "--tp", "1,2", "--engines", "core", "--keep", str(tmp_path / "kept")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL: 3 of 3 rows out of tolerance" in out
    assert os.path.isdir(tmp_path / "kept")  # --keep: the working directory stays
