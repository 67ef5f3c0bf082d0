"""`sp-core verify`: a reduced matrix passes; an engine asked for that cannot run is exit 3; a disagreeing
engine fails it; the terminal stays quiet; no working files are left behind."""
import functools
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from sp_core.app import verify
from sp_core.app.cli import main
from sp_core.app.tiny import make_checkpoint

OUTPUT_KINDS = ("[verify ", "model ", "qwen2 ", "qwen3 ", "qwen3-moe ", "deepseek-", "round-trip ", "PASS", "FAIL", "not run:",
                "note:", "sp-core verify: framework output")
MAX_LINES = 60  # issue 12: the default verify output on a 2-core machine


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
    proc = subprocess.run([sys.executable, "-m", "sp_core.app.cli", "verify", "--tp", "1,2", "--json", str(report)],
                          capture_output=True, text=True, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if not line.startswith(OUTPUT_KINDS)] == [], output
    assert "not run: engine sglang cannot run here:" in proc.stdout
    assert "not run: the round trip needs both megatron and sglang" in proc.stdout
    data = json.loads(report.read_text())
    rows = data["rows"]
    # Qwen2, Qwen3: 2 engines x (tp 1, tp 2 SP off, tp 2 SP on); none of sglang. Qwen3-MoE, DeepSeek V2, V2-Lite,
    # V3, V3 in FP8, V3.2: 2 engines x (3, and tp 2 SP on with expert parallelism); an explicit --tp: Megatron
    # runs the FP8 checkpoint too
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows), rows
    assert sorted({r["model"] for r in rows if r["moe"] == "ep"}) == ["deepseek-v2", "deepseek-v2-lite", "deepseek-v3",
                                                                     "deepseek-v3-fp8", "deepseek-v32", "qwen3-moe"]
    assert "megatron does not run" not in proc.stdout
    assert len([r for r in rows if r["engine"] == "megatron" and r["model"].startswith("deepseek")]) == 20
    assert all(r["vs_reference"] <= 1e-4 and r["tokens_equal"] for r in rows)
    assert all(r["vs_sp_off"] <= 1e-5 for r in rows if r["sp"] and r["moe"] == "tp")
    core_tp1 = [r for r in rows if r["engine"] == "core" and r["tp"] == 1]
    assert all(r["vs_core_tp1"] is None for r in core_tp1)  # no comparison with itself
    assert data["exit_code"] == 3 and data["unavailable"] == {"sglang": data["unavailable"]["sglang"]}
    assert "PASS: all 60 rows within tolerance" in proc.stdout
    assert len(output.splitlines()) <= MAX_LINES, output
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


def _stand_in_engines():
    """Test stand-ins for the three engines: transformers' log-probabilities, shifted by a different small
    constant per call (so that every row has its own number; argmax and tolerances unchanged)."""
    @functools.lru_cache(maxsize=None)
    def reference(model_dir):
        return verify.reference_logprobs(model_dir, verify.PROMPTS)

    calls = []

    def logprobs(model_dir, prompts, tp, sequence_parallel, dtype, **_):
        calls.append(model_dir)
        return [x + 5e-7 * len(calls) for x in reference(model_dir)]  # 109 rows: the last within 1e-4

    def train_and_export(model_dir, out_dir, tp, sequence_parallel, steps, prompts):
        shutil.copytree(model_dir, out_dir)
        return logprobs(out_dir, prompts, tp, sequence_parallel, None)

    return {"core": SimpleNamespace(logprobs=logprobs),
            "megatron": SimpleNamespace(logprobs=logprobs, train_and_export=train_and_export),
            "sglang": SimpleNamespace(logprobs=logprobs, max_default_tp=lambda: 2)}  # as on a 2-core CPU


def test_default_output_fits_on_a_screen(tmp_path, monkeypatch, capsys):
    """The default matrix (every engine and embedded model, the round trip; sglang within 2 cores) prints its
    progress, table and verdict in at most 60 lines, and every row's comparisons are in the table: each row's
    |d logprob| against transformers in its setting's column, the worst against the core at tp 1 and against
    SP off per line; the core at tp 1 is never compared with itself."""
    monkeypatch.setattr(verify, "check_engines", lambda names: (_stand_in_engines(), {}))
    monkeypatch.setenv("SP_CORE_LOG_DIR", str(tmp_path / "logs"))
    report = tmp_path / "report.json"
    code = main(["verify", "--json", str(report)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 0, output
    assert len(output.splitlines()) <= MAX_LINES, f"{len(output.splitlines())} lines:\n{output}"
    rows = json.loads(report.read_text())["rows"]
    assert {r["model"] for r in rows} == set(verify.DEFAULT_MODELS) | {"round-trip"}
    assert {r["engine"] for r in rows} == {"core", "megatron", "sglang", "megatron (trained)", "sglang (export)"}
    engines_of = {m: {r["engine"] for r in rows if r["model"] == m} for m in ("qwen3-moe", "deepseek-v3-fp8")}
    assert engines_of == {"qwen3-moe": {"core", "megatron", "sglang"}, "deepseek-v3-fp8": {"core", "sglang"}}
    assert f"PASS: all {len(rows)} rows within tolerance" in captured.out
    table = captured.out.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("model "))
    assert table[header].split()[2:9] == ["tp1", "tp2", "tp2", "SP", "tp4", "tp4", "SP"]  # then ep2 SP, ep4 SP
    assert "ep2 SP" in table[header] and "ep4 SP" in table[header]  # expert parallelism: columns, not lines
    lines = {}
    for r in rows:
        lines.setdefault((r["model"], r["engine"]), []).append(r)  # both MoE modes on one line
    body = table[header + 1:header + 1 + len(lines)]
    for (model, engine), line_rows in lines.items():
        line = next(line for line in body
                    if line.startswith(f"{model} ") and line[len(model):].strip().startswith(engine + " "))
        for r in line_rows:
            assert f"{r['vs_reference']:.1e}" in line, (r, line)
        for key in ("vs_core_tp1", "vs_sp_off"):
            values = [r[key] for r in line_rows if r[key] is not None]
            assert (f"{max(values):.1e}" if values else "—") in line, (key, line)
    assert all(r["vs_core_tp1"] is None for r in rows if r["engine"] == "core" and r["tp"] == 1)
    assert all(r["vs_core_tp1"] is not None for r in rows if r["engine"] in ("core", "megatron", "sglang") and
               not (r["engine"] == "core" and r["tp"] == 1 and r["moe"] == "tp"))


def test_bitwise_pairs_fail_where_they_differ_in_the_last_bit():
    """--deterministic: a megatron / sglang pair that differs in the last bit fails both rows (every model,
    DeepSeek-V3.2's sparse attention included)."""
    rows = [verify.Row("m", "megatron", 2, True, vs_reference=1e-6, vs_core_tp1=1e-6, tokens_equal=True),
            verify.Row("m", "sglang", 2, True, vs_reference=1e-6, vs_core_tp1=1e-6, tokens_equal=True)]
    a = [torch.tensor([1.0, 2.0])]
    b = [torch.tensor([1.0, 2.0 + 2 ** -22])]  # one ulp-sized difference: within tolerance, not bitwise
    results = {("m", "megatron", 2, True, "tp", 1): a, ("m", "sglang", 2, True, "tp", 1): b}  # ..., moe, cp
    verify._mark_bitwise_pair(rows[1], rows, results)
    assert [r.bitwise for r in rows] == [False, False] and not any(r.passed for r in rows)
    assert "differ bitwise" in rows[0].status
