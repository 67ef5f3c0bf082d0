"""Bad input on every command: one line on stderr, exit 2, before any work (issue 13's table).

Each case names the defect it guards. Most cases stop before a rank starts, so the table is cheap.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sp_core.app import cli
from sp_core.app.cli import main
from support.checkpoints import make_checkpoint

PROMPTS = [[3, 1, 4, 1, 5], [9]]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny checkpoint, a prompts file and a family of broken variants."""
    root = tmp_path_factory.mktemp("bad")
    model = make_checkpoint("qwen3", str(root / "model"))
    (root / "prompts.json").write_text(json.dumps(PROMPTS))

    def variant(name, edit_config=None, edit_weights=None, raw_config=None, raw_weights=None):
        path = root / name
        shutil.copytree(model, path)
        if edit_config or raw_config is not None:
            cfg = json.loads((path / "config.json").read_text())
            text = raw_config if raw_config is not None else json.dumps(edit_config(cfg) or cfg)
            (path / "config.json").write_text(text)
        if edit_weights:
            weights = load_file(str(path / "model.safetensors"))
            edit_weights(weights)
            save_file(weights, str(path / "model.safetensors"))
        if raw_weights:
            raw_weights(path / "model.safetensors")

    variant("cfg-malformed", raw_config='{"architectures": ["Qwen3ForCausalLM"], ')
    variant("cfg-not-object", raw_config="[1, 2]")
    variant("cfg-wrong-type", edit_config=lambda c: c.update(hidden_size="48"))
    variant("cfg-missing-key", edit_config=lambda c: c.pop("num_attention_heads") and None)
    variant("st-truncated", raw_weights=lambda p: p.write_bytes(p.read_bytes()[:-64]))
    variant("st-garbage", raw_weights=lambda p: p.write_bytes(os.urandom(512)))
    variant("st-wrong-shape", edit_weights=lambda w: w.update({"model.norm.weight": torch.ones(47)}))
    variant("st-missing", edit_weights=lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    variant("st-nan", edit_weights=lambda w: w["model.norm.weight"].__setitem__(0, float("nan")))
    variant("st-fp8", edit_weights=lambda w: w.update(
        {"model.layers.0.mlp.up_proj.weight": w["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)}))
    make_checkpoint("qwen3", str(root / "heads64"), num_attention_heads=64, num_key_value_heads=64)
    # 6 experts: whole experts split over tp 2, not over tp 4 (experts split by intermediate size do)
    make_checkpoint("deepseek-v3", str(root / "ds-6-experts"), n_routed_experts=6, n_group=2, topk_group=1)
    (root / "bad-utf8.json").write_bytes(b"[[1, 2, \xff]]")
    (root / "too-long.json").write_text(json.dumps([[1] * 256]))  # max_position_embeddings 256
    (root / "export").mkdir()
    (root / "export" / "model.safetensors.index.json").write_text("{}")  # a stale export
    return root


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


M, P = "{root}/model", "{root}/prompts.json"
LOGITS = ["logits", "--model", M, "--prompts", P, "--out", "{root}/out.safetensors"]
TRAIN = ["train", "--model", M, "--out", "{root}/trained"]
CASES = [
    # (defect, argv, expected text in the one line)
    ("verify --tp 0 passed vacuously", ["verify", "--tp", "0"], "argument --tp: expected comma-separated positive"),
    ("verify --tp -1 was a tolerance failure", ["verify", "--tp", "-1"], "argument --tp"),
    ("verify --tp abc traceback", ["verify", "--tp", "abc"], "got 'abc'"),
    ("verify --engines '' passed vacuously", ["verify", "--engines", ""], "argument --engines"),
    ("verify --tp 3 passed vacuously", ["verify", "--model", M, "--tp", "3"], "tp 3 does not divide num_attention_heads"),
    ("verify --json checked after the work", ["verify", "--model", M, "--json", "{root}/no/such/dir/r.json"],
     "the directory"),
    ("train --steps 0", TRAIN + ["--steps", "0"], "argument --steps: expected a positive integer"),
    ("train --tp 0", TRAIN + ["--tp", "0"], "argument --tp: expected a positive integer"),
    ("train --seq-length 0", TRAIN + ["--seq-length", "0"], "argument --seq-length"),
    ("train --micro-batch-size 0", TRAIN + ["--micro-batch-size", "0"], "argument --micro-batch-size"),
    ("train --lr nan", TRAIN + ["--lr", "nan"], "argument --lr: expected a positive finite number"),
    ("train --micro-batch-size 10**12: exit 5 from the allocator inside a rank after ~29 s",
     TRAIN + ["--micro-batch-size", str(10**12)], "tokens a step need at least"),
    ("train --micro-batch-size x --seq-length past memory at tp 2 with SP",
     TRAIN + ["--tp", "2", "--micro-batch-size", str(10**9), "--seq-length", "128"], "use a smaller --micro-batch-size"),
    ("train --out = --model overwrote the input", ["train", "--model", M, "--out", M], "overlaps the input checkpoint"),
    ("train --out non-empty kept a stale index", ["train", "--model", M, "--out", "{root}/export"], "is not empty"),
    ("train --out checked after the work", ["train", "--model", M, "--out", "{root}/no/such/dir"], "does not exist"),
    ("logits --out overwrote the checkpoint", LOGITS[:-1] + [M + "/model.safetensors"],
     "inside the checkpoint directory"),
    ("logits --out overwrote the prompts", LOGITS[:-1] + [P], "would overwrite the input"),
    ("logits --out checked after the work", LOGITS[:-1] + ["{root}/no/such/dir/o.safetensors"], "does not exist"),
    ("tp not guarded against CPU cores", LOGITS[:2] + ["{root}/heads64"] + LOGITS[3:] + ["--tp", "64"],
     "would start 64 CPU ranks on"),
    ("memory --tp abc", ["memory", "--model", M, "--tp", "abc", "--tokens", "8"], "argument --tp"),
    ("logits --cp 0", LOGITS + ["--cp", "0"], "argument --cp: expected a positive integer"),
    ("memory --cp abc", ["memory", "--model", M, "--tp", "1", "--cp", "abc", "--tokens", "8"], "argument --cp"),
    ("verify --cp 0", ["verify", "--cp", "0"], "argument --cp: expected comma-separated positive"),
    ("cp x tp not guarded against CPU cores", LOGITS + ["--cp", "16", "--tp", "4"],
     "--cp 16 x --tp 4 = 64 would start 64 CPU ranks on"),
    ("sglang --cp 2 served cp 1", LOGITS + ["--engine", "sglang", "--cp", "2"],
     "--cp 2: engine 'sglang' runs cp 1 only: sglang's prefill context parallelism (--attn-cp-size) is GPU / NPU-only"),
    ("train --cp 2 with a sequence Megatron cannot split", TRAIN + ["--cp", "2", "--tp", "2", "--seq-length", "36"],
     "--seq-length 36 does not split over --cp 2: Megatron's context parallelism needs it divisible by 2 x cp x tp"),
    ("cp x tp that does not divide the heads", LOGITS + ["--cp", "2", "--tp", "3"], "tp 3 does not divide"),
    ("malformed config.json", LOGITS[:2] + ["{root}/cfg-malformed"] + LOGITS[3:], "config.json: not valid JSON"),
    ("config.json not an object", LOGITS[:2] + ["{root}/cfg-not-object"] + LOGITS[3:], "not an object"),
    ("config.json wrong type", LOGITS[:2] + ["{root}/cfg-wrong-type"] + LOGITS[3:],
     '"hidden_size" must be a positive integer'),
    ("config.json missing key", ["memory", "--model", "{root}/cfg-missing-key", "--tp", "1", "--tokens", "8"],
     'missing "num_attention_heads"'),
    ("truncated safetensors", LOGITS[:2] + ["{root}/st-truncated"] + LOGITS[3:], "truncated or corrupt"),
    ("corrupt safetensors", ["train", "--model", "{root}/st-garbage", "--out", "{root}/t2"], "truncated or corrupt"),
    ("invalid-UTF-8 prompts", LOGITS[:4] + ["{root}/bad-utf8.json"] + LOGITS[5:], "not UTF-8 text"),
    ("FP8 weights without quantization_config: exit 5 inside a rank", LOGITS[:2] + ["{root}/st-fp8"] + LOGITS[3:],
     "checkpoint tensor model.layers.0.mlp.up_proj.weight is stored in FP8 (F8_E4M3)"),
    ("memory --moe-parallel ep on a dense model accepted", ["memory", "--model", M, "--tp", "2", "--tokens", "8",
                                                            "--moe-parallel", "ep"], "has no MoE layers"),
    ("train --moe-parallel ep on a dense model: exit 5 after ~25 s", TRAIN + ["--tp", "2", "--moe-parallel", "ep"],
     "has no MoE layers"),
    ("onpolicy --steps 0", ["onpolicy", "--steps", "0"], "argument --steps: expected a positive integer"),
    ("onpolicy --tp 3 on 4 heads", ["onpolicy", "--model", M, "--tp", "3"], "tp 3 does not divide"),
    ("onpolicy --server-tp 0", ["onpolicy", "--server-tp", "0"], "argument --server-tp"),
    ("onpolicy --bucket-mb 0", ["onpolicy", "--bucket-mb", "0"], "argument --bucket-mb: expected a positive integer"),
    ("onpolicy --json checked after the work", ["onpolicy", "--model", M, "--json", "{root}/no/such/dir/r.json"],
     "the directory"),
    ("onpolicy --moe-parallel ep on a dense model", ["onpolicy", "--model", M, "--moe-parallel", "ep"],
     "has no MoE layers"),
    ("onpolicy --server-moe-parallel ep on a dense model", ["onpolicy", "--model", M, "--server-moe-parallel", "ep"],
     "--server-moe-parallel ep: Qwen3ForCausalLM here has no MoE layers; use --server-moe-parallel tp"),
    ("onpolicy --server-moe-parallel xp", ["onpolicy", "--server-moe-parallel", "xp"],
     "argument --server-moe-parallel: invalid choice: 'xp'"),
    ("onpolicy server ep over a tp the experts do not split by", ["onpolicy", "--model", "{root}/ds-6-experts", "--tp",
                                                                  "4", "--server-moe-parallel", "ep"],
     "--server-moe-parallel ep: tp 4 does not divide n_routed_experts (6) (expert parallelism places whole experts "
     "on ranks); use --server-moe-parallel tp"),
    ("onpolicy ep at a server tp the experts do not split by", ["onpolicy", "--model", "{root}/ds-6-experts",
                                                                "--moe-parallel", "ep", "--server-tp", "4"],
     "--moe-parallel ep: tp 4 does not divide n_routed_experts (6)"),
]
# a bad checkpoint or a too-long prompt: the same one line on every engine, before the engine starts
# (sglang used to SIGKILL sp-core itself, exit 137)
for _engine in ("core", "megatron", "sglang"):
    CASES += [
        (f"{_engine}: wrong-shape tensor", LOGITS[:2] + ["{root}/st-wrong-shape"] + LOGITS[3:] + ["--engine", _engine],
         "wrong shape: model.norm.weight [47] (expected [48])"),
        (f"{_engine}: --moe-parallel ep on a dense model", LOGITS + ["--engine", _engine, "--tp", "2", "--moe-parallel", "ep"],
         "--moe-parallel ep: Qwen3ForCausalLM here has no MoE layers"),
        (f"{_engine}: missing tensor", LOGITS[:2] + ["{root}/st-missing"] + LOGITS[3:] + ["--engine", _engine, "--tp", "2"],
         "missing: model.layers.1.mlp.up_proj.weight"),
        (f"{_engine}: prompt too long", LOGITS[:4] + ["{root}/too-long.json"] + LOGITS[5:] + ["--engine", _engine],
         "prompt 0 has 256 tokens; at most 255 fit"),
    ]


@pytest.mark.parametrize("defect,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(work, capsys, defect, argv, expected):
    argv = [a.format(root=work) for a in argv]
    before = {p: os.path.getmtime(p) for p in (work / "model").iterdir()}
    code, err, _ = _run(capsys, argv)
    assert code == 2, (defect, err)
    assert len(err) == 1 and expected in err[0], (defect, err)
    assert "Traceback" not in err[0]
    assert {p: os.path.getmtime(p) for p in (work / "model").iterdir()} == before  # the checkpoint is untouched
    assert not (work / "trained").exists() and not (work / "out.safetensors").exists()


def test_nan_weights_are_an_error_not_a_result(work, capsys):
    code, err, _ = _run(capsys, ["logits", "--model", str(work / "st-nan"), "--prompts", str(work / "prompts.json"),
                                 "--out", str(work / "nan.safetensors"), "--verbose"])
    assert code == 2 and err[-1].endswith("checkpoint tensor model.norm.weight contains NaN or inf"), err
    assert not (work / "nan.safetensors").exists()


def test_overflowing_outputs_exit_4(work, capsys):
    """Finite weights whose outputs overflow to inf / NaN: exit 4, nothing written."""
    path = work / "overflow"
    shutil.copytree(work / "model", path)
    weights = load_file(str(path / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 3e38)
    save_file(weights, str(path / "model.safetensors"))
    code, err, _ = _run(capsys, ["logits", "--model", str(path), "--prompts", str(work / "prompts.json"),
                                 "--out", str(work / "overflow.safetensors")])
    assert code == 4 and "contain NaN or inf" in err[-1], err
    assert not (work / "overflow.safetensors").exists()


def test_every_flag_has_help_and_default(capsys):
    parser = cli._parser()
    top = parser.format_help()
    assert "bench" not in top  # no advertised command that does not exist
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sorted(subparsers.choices) == ["logits", "memory", "onpolicy", "train", "verify"]
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and ("default" in action.help or "required" in action.help), (name, action.dest)


def test_missing_reference_framework_is_one_line_exit_3(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    code, err, _ = _run(capsys, ["verify", "--engines", "core", "--tp", "1"])
    assert code == 3 and len(err) == 1 and "pip install 'sp-core[verify]'" in err[0], err


@pytest.mark.parametrize("engine", ["core", "megatron", "sglang", "train"])
def test_nan_in_a_routed_expert_is_exit_2_at_load(tmp_path, capsys, engine):
    """A NaN in one routed expert (per-expert tensors; the fused form for the core) fails the load with one
    line, exit 2, and no file, whatever the prompts route to (before: exit 4 when a prompt reached the
    expert, exit 0 and a file when none did)."""
    model = make_checkpoint("deepseek-v3", str(tmp_path / "model"))
    weights = load_file(os.path.join(model, "model.safetensors"))
    weights["model.layers.1.mlp.experts.7.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, os.path.join(model, "model.safetensors"))
    fused = str(tmp_path / "fused")
    shutil.copytree(model, fused)
    names = sorted(k for k in weights if ".mlp.experts." in k)
    for proj in ("gate_up_proj", "down_proj"):
        pieces = [torch.cat([weights[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"],
                             weights[f"model.layers.1.mlp.experts.{e}.up_proj.weight"]])
                  if proj == "gate_up_proj" else weights[f"model.layers.1.mlp.experts.{e}.down_proj.weight"]
                  for e in range(8)]
        weights[f"model.layers.1.mlp.experts.{proj}"] = torch.stack(pieces)
    save_file({k: v for k, v in weights.items() if k not in names}, os.path.join(fused, "model.safetensors"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[3], [9]]))
    for form, path, tensor in [("per expert", model, "model.layers.1.mlp.experts.7.down_proj.weight"),
                               ("fused", fused, "model.layers.1.mlp.experts.down_proj")][: 2 if engine == "core" else 1]:
        out = tmp_path / f"{engine}-{form}.safetensors"
        argv = (["train", "--model", path, "--out", str(out), "--tp", "2"] if engine == "train" else
                ["logits", "--model", path, "--prompts", str(prompts), "--out", str(out), "--engine", engine])
        code, err, _ = _run(capsys, argv)
        assert code == 2 and err[-1].endswith(f"checkpoint tensor {tensor} contains NaN or inf"), (form, err)
        assert not out.exists()


DEEPSEEK_BAD_CONFIG = [  # (key, value, the one line says) -- each exited 1 as "unexpected" or failed in a rank
    ("num_experts_per_tok", "3", '"num_experts_per_tok" must be a positive integer or null'),
    ("num_experts_per_tok", 2.5, '"num_experts_per_tok" must be a positive integer or null'),
    ("n_group", "4", '"n_group" must be a positive integer'),
    ("kv_lora_rank", "16", '"kv_lora_rank" must be a positive integer'),
    ("q_lora_rank", "24", '"q_lora_rank" must be a positive integer or null, got \'24\''),
    ("q_lora_rank", 24.5, '"q_lora_rank" must be a positive integer or null, got 24.5'),
    ("q_lora_rank", True, '"q_lora_rank" must be a positive integer or null, got True'),
    ("q_lora_rank", -1, '"q_lora_rank" must be a positive integer or null, got -1'),
    ("n_routed_experts", "8", '"n_routed_experts" must be a positive integer'),
    ("moe_intermediate_size", "16", '"moe_intermediate_size" must be a positive integer'),
    ("first_k_dense_replace", "1", '"first_k_dense_replace" must be a non-negative integer'),
    ("routed_scaling_factor", "abc", '"routed_scaling_factor" must be a positive number'),
    ("quantization_config", "fp8", '"quantization_config" must be an object or null'),
    ("quantization_config", ["fp8"], '"quantization_config" must be an object or null'),
]


@pytest.mark.parametrize("key,value,expected", DEEPSEEK_BAD_CONFIG, ids=[f"{k}={v!r}" for k, v, _ in DEEPSEEK_BAD_CONFIG])
def test_wrongly_typed_deepseek_config_is_one_line_and_exit_2(tmp_path_factory, capsys, key, value, expected):
    root = tmp_path_factory.getbasetemp() / "deepseek-v3-config"
    if not (root / "model" / "config.json").exists():
        make_checkpoint("deepseek-v3", str(root / "model"))
    model = tmp_path_factory.mktemp("bad-deepseek")
    shutil.copytree(root / "model", model, dirs_exist_ok=True)
    cfg = json.loads((model / "config.json").read_text())
    cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # the checkpoint writer's progress
    code, err, _ = _run(capsys, ["memory", "--model", str(model), "--tp", "1", "--tokens", "8"])
    assert code == 2 and len(err) == 1 and expected in err[0], err


ENVIRONMENT = [  # (variable, value, the one line says) -- each exited 1 as "unexpected" (or a traceback)
    ("SP_CORE_COLLECTIVE_TIMEOUT", "abc", "SP_CORE_COLLECTIVE_TIMEOUT='abc': expected a positive number of seconds"),
    ("SP_CORE_MAX_CPU_RANKS", "two", "SP_CORE_MAX_CPU_RANKS='two': expected a positive integer"),
    ("SP_CORE_ENGINE_TIMEOUT", "soon", "SP_CORE_ENGINE_TIMEOUT='soon': expected a positive number of seconds"),
    ("SP_CORE_LOG_DIR", "{root}/prompts.json", "is not a directory"),
]


@pytest.mark.parametrize("name,value,expected", ENVIRONMENT, ids=[e[0] for e in ENVIRONMENT])
def test_mistyped_environment_is_one_line_and_exit_2(work, capsys, monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value.format(root=work))
    code, err, _ = _run(capsys, LOGITS[:1] + [a.format(root=work) for a in LOGITS[1:]])
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (work / "out.safetensors").exists()


def _without(*keys):
    return lambda rope: [rope.pop(k) for k in keys]


ROPE_BAD_CONFIG = [  # (model, edit of its rope dict, the one line says) -- each exited 1 as "unexpected"
    ("deepseek-v3", _without("factor", "original_max_position_embeddings"),
     'rope_parameters of rope_type \'yarn\' has no "factor"; yarn needs "factor" (a positive number) or '
     '"original_max_position_embeddings"'),
    ("deepseek-v3", lambda r: r.update(original_max_position_embeddings="64"),
     'rope_parameters "original_max_position_embeddings" must be a positive integer for rope_type \'yarn\', got \'64\''),
    ("deepseek-v3", lambda r: r.update(mscale_all_dim="0.5"), '"mscale_all_dim" must be a number'),
    ("deepseek-v2", _without("factor", "original_max_position_embeddings"),  # the legacy rope_scaling form
     'rope_scaling of rope_type \'yarn\' has no "factor"'),
    ("qwen3", lambda r: r.update(rope_type="yarn"), 'rope_parameters of rope_type \'yarn\' has no "factor"'),
    ("qwen3", lambda r: r.update(rope_type="linear"), 'rope_parameters of rope_type \'linear\' has no "factor"; '
                                                      'linear needs "factor" (a positive number)'),
    ("qwen3", lambda r: r.update(rope_type="dynamic", factor="2"),
     'rope_parameters "factor" must be a positive number for rope_type \'dynamic\', got \'2\''),
    ("qwen3", lambda r: r.update(rope_type="llama3", factor=8.0),
     "rope_parameters rope_type 'llama3' is not supported; supported: default, linear, dynamic, yarn"),
]


@pytest.mark.parametrize("name,edit,expected", ROPE_BAD_CONFIG, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ROPE_BAD_CONFIG)])
def test_rope_keys_are_checked_per_rope_type(tmp_path_factory, capsys, name, edit, expected):
    """Each rope type's keys (sp_core/layers/rotary.py reads factor for linear / dynamic / yarn, YaRN's
    original context, betas, mscales): a missing or wrongly typed one, or a rope type not implemented, is one
    line and exit 2 (before: exit 1 "unexpected KeyError: 'factor'" / TypeError / ValueError)."""
    root = tmp_path_factory.getbasetemp() / f"{name}-config"
    if not (root / "model" / "config.json").exists():
        make_checkpoint(name, str(root / "model"))
    model = tmp_path_factory.mktemp("bad-rope")
    shutil.copytree(root / "model", model, dirs_exist_ok=True)
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg["rope_scaling" if "rope_scaling" in cfg else "rope_parameters"])
    (model / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # the checkpoint writer's progress
    code, err, _ = _run(capsys, ["memory", "--model", str(model), "--tp", "1", "--tokens", "8"])
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_yarn_without_original_context_takes_max_position_embeddings():
    """As transformers: a YaRN config without original_max_position_embeddings uses max_position_embeddings
    (before: KeyError inside the rank); one with only the original context derives the factor."""
    from sp_core.app.tiny import hf_config
    from sp_core.models import ModelConfig

    raw = hf_config("deepseek-v3").to_dict()
    raw["architectures"] = ["DeepseekV3ForCausalLM"]
    raw["rope_parameters"].pop("original_max_position_embeddings")
    assert ModelConfig.from_dict(raw).rope_scaling["original_max_position_embeddings"] == 256
    raw["rope_parameters"].update(original_max_position_embeddings=32, factor=None)
    assert ModelConfig.from_dict(raw).rope_scaling["factor"] == 8.0


def test_verify_refuses_a_bad_tp_before_keep_gets_anything(tmp_path, capsys):
    """``verify --tp 3 --keep DIR`` wrote the six embedded checkpoints into DIR before refusing the tp; and verify's
    --keep refusals suggested a --force that verify does not take."""
    keep = tmp_path / "kept"
    code, err, _ = _run(capsys, ["verify", "--tp", "3", "--keep", str(keep)])
    assert code == 2 and len(err) == 1 and "the embedded qwen2 checkpoint: " in err[0] and "tp 3" in err[0], err
    assert not keep.exists(), sorted(p.name for p in keep.iterdir())
    keep.mkdir()
    (keep / "old").write_text("x")
    code, err, _ = _run(capsys, ["verify", "--tp", "1", "--keep", str(keep)])
    assert code == 2 and len(err) == 1 and "is not empty" in err[0] and "--force" not in err[0], err
