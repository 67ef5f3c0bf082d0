"""Qwen3-MoE and Qwen2-MoE trained inside real megatron-core through the Megatron adapter (its DDP,
schedules, finalize_model_grads and optimizer; gloo, float32): the engine's log-probabilities equal
transformers', training at t = 2 (both MoE modes with SP, and SP off) equals t = 1 (losses, step-0
gradients, Megatron's grad norm), and the export of the trained model loads in transformers with the trained
model's own log-probabilities; Megatron's dist checkpoint of a model trained at t = 2 with expert parallelism
loads at t = 1 with the trained model's own log-probabilities. One rank launch per world size (t = 2 first: it
saves the dist checkpoint that t = 1 loads). And `sp-core train` as a user types it: Qwen2-MoE (float32, the
export equal to the trained model), and Qwen3-MoE in the published block-FP8 format (bfloat16 training and export).

The steps use Megatron's SGD: with Adam the step-0 losses, gradients and grad norm agree to 1e-7 relative, but
later steps drift apart (qwen3-moe at t = 2, SP: grad norm 2e-6, 4e-5, 6e-5 relative at steps 1-3), Adam's
per-parameter normalisation amplifying float32 rounding in near-zero gradients; with SGD every step holds 1e-5,
which a gradient summed wrongly after step 0 (parameters out of step over TP) would still break."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from sp_core.app.cli import main
from sp_core.app.tiny import PROMPTS, make_checkpoint, reference_logprobs
from support.compare import max_diff, rel
from support.multirank import run_ranks

ARCHS = ("qwen3-moe", "qwen2-moe")
STEPS = 4


def _settings(tp):
    if tp == 1:
        return [(a, "tp", False) for a in ARCHS]
    return [(a, m, True) for a in ARCHS for m in ("tp", "ep")] + [(a, "tp", False) for a in ARCHS]


def _train_every_setting(dirs, tp, root):
    """Every setting's training run at ``tp``; at t = 2 (SP on) the trained models exported to ``root``, and
    with expert parallelism also saved as Megatron dist checkpoints, which t = 1 loads (``resumed``)."""
    from megatron.core import dist_checkpointing, parallel_state

    from sp_core import mpu
    from sp_core_megatron.cli_engine import cpu_training, engine, training
    from sp_core_megatron.export import export_hf_checkpoint

    cpu_training.enable()
    out = {}
    for arch, mode, sp in _settings(tp):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        model = engine.build_model(dirs[arch], tp, sp, torch.float32, mode)
        untrained = engine.model_logprobs(model.eval(), PROMPTS)
        model.train()
        norms = []
        _, losses, grads = training.train(model, STEPS, clip_grad=engine.clip_grad_default(), optimizer="sgd", lr=0.05,
                                          capture_step0_grads=True, grad_norms=norms)
        run = {"losses": losses, "grads0": grads, "grad_norms": norms, "untrained": untrained}
        if tp == 2 and sp:
            model.eval()
            run["logprobs"] = engine.model_logprobs(model, PROMPTS)
            export_hf_checkpoint(model, f"{root}/{arch}-{mode}")
            if mode == "ep":
                os.makedirs(f"{root}/dist-{arch}", exist_ok=True)
                dist_checkpointing.save(model.sharded_state_dict(), f"{root}/dist-{arch}")
        out[(arch, mode, sp)] = run if mpu.default_context().rank == 0 else None
    resumed = {}
    if tp == 1:  # whole experts per rank at t = 2 -> every expert on the one rank, in TP mode
        for arch in ARCHS:
            parallel_state.destroy_model_parallel()
            model = engine.build_model(dirs[arch], tp, False, torch.float32, "tp")
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{root}/dist-{arch}"))
            resumed[arch] = engine.model_logprobs(model.eval(), PROMPTS)
    return {"runs": out, "resumed": resumed}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron-qwen-moe")
    return {name: make_checkpoint(name, str(root / name)) for name in ARCHS}


@pytest.fixture(scope="module")
def launches(dirs, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("megatron-qwen-moe-out"))
    two = run_ranks(2, _train_every_setting, dirs, 2, root, timeout=600)[0]
    one = run_ranks(1, _train_every_setting, dirs, 1, root, timeout=600)[0]
    return {"root": root, 2: two["runs"], 1: one["runs"], "resumed": one["resumed"]}


def test_megatron_logprobs_equal_transformers(dirs, launches):
    for tp in (1, 2):
        for (arch, mode, sp), run in launches[tp].items():
            diff = max_diff(run["untrained"], reference_logprobs(dirs[arch], PROMPTS))
            assert diff <= 1e-4, f"{arch} t={tp} moe={mode} SP={sp}: {diff:.2e} vs transformers"


def test_training_at_tp2_equals_tp1_and_round_trip(dirs, launches):
    from safetensors.torch import load_file

    for arch, mode, sp in _settings(2):
        base, got = launches[1][(arch, "tp", False)], launches[2][(arch, mode, sp)]
        what = f"{arch} moe={mode} SP={sp}"
        assert base["losses"][-1] < base["losses"][0], f"{arch}: the loss should fall on the built-in stream"
        assert max(abs(a - b) / b for a, b in zip(got["losses"], base["losses"])) <= 1e-5, \
            f"{what}: losses {got['losses']} vs {base['losses']}"
        assert got["grads0"].keys() == base["grads0"].keys()
        for key in ("mlp.gate.weight", "mlp.experts.0.gate_proj") + (("shared_expert_gate",) if "qwen2" in arch else ()):
            assert any(key in k and g.abs().max() > 0 for k, g in base["grads0"].items()), key
        worst = max((rel(got["grads0"][k], g), k) for k, g in base["grads0"].items())
        assert worst[0] <= 1e-5, f"{what}: step-0 gradient of {worst[1]} off by {worst[0]:.2e} relative"
        for a, b in zip(got["grad_norms"], base["grad_norms"]):
            assert abs(a - b) <= 1e-5 * b, f"{what}: grad norm {got['grad_norms']} vs {base['grad_norms']}"
        if sp:
            out = f"{launches['root']}/{arch}-{mode}"
            assert load_file(f"{out}/model.safetensors").keys() == load_file(f"{dirs[arch]}/model.safetensors").keys()
            diff = max_diff(got["logprobs"], reference_logprobs(out, PROMPTS))
            assert diff <= 1e-5, f"{what}: transformers on the export vs the trained Megatron model: {diff:.2e}"


def test_dist_checkpoint_of_expert_parallel_training_loads_at_tp1(launches):
    """Megatron's dist_checkpointing: saved at t = 2 with whole experts per rank and SP after training (Qwen2-MoE:
    with its shared expert and gate), loaded at t = 1: the trained model's own log-probabilities come back."""
    for arch in ARCHS:
        run = launches[2][(arch, "ep", True)]
        assert max_diff(run["logprobs"], run["untrained"]) > 1e-3, f"{arch}: training changed nothing"
        diff = max_diff(launches["resumed"][arch], run["logprobs"])
        assert diff <= 1e-5, f"{arch}: the dist checkpoint loaded at t = 1: {diff:.2e}"


BF16_TOL = 0.1  # a bfloat16 model's log-probabilities against transformers on its own weights in float32 (measured 0.04)


def _train_command(monkeypatch, *args):
    """`sp-core train ARGS` as a user types it; returns the trained Megatron model's log-probabilities of PROMPTS,
    taken by the same launch (the engine's ``train_steps`` asked for them too)."""
    from sp_core_megatron.cli_engine import engine

    trained = {}
    train_steps = engine.train_steps
    monkeypatch.setattr(engine, "train_steps", lambda *a, **k: trained.update(train_steps(*a, prompts=PROMPTS, **k))
                        or trained)
    assert main(["train", *args, "--steps", "2", "--seq-length", "16"]) == 0
    return trained["logprobs"]


def test_train_command_exports_what_transformers_loads_equal_to_megatron(dirs, tmp_path, capfd, monkeypatch):
    """`sp-core train` on Qwen2-MoE (shared expert, dense first layer), tp 2, SP: the float32 export loads in
    transformers with the trained Megatron model's own log-probabilities."""
    out = str(tmp_path / "trained")
    trained = _train_command(monkeypatch, "--model", dirs["qwen2-moe"], "--tp", "2", "--lr", "0.01", "--out", out)
    assert "| float32" in capfd.readouterr().err
    exported = reference_logprobs(out, PROMPTS)
    assert max_diff(exported, reference_logprobs(dirs["qwen2-moe"], PROMPTS)) > 1e-2, "training changed nothing"
    diff = max_diff(trained, exported)
    assert diff <= 1e-5, f"transformers on the export vs the trained Megatron model: {diff:.2e}"


def test_train_command_from_an_fp8_checkpoint_trains_and_exports_bfloat16(tmp_path, capfd, monkeypatch):
    """`sp-core train` from Qwen3-MoE in the published block-FP8 format (as Qwen3-30B-A3B-FP8), tp 2, expert
    parallelism: it trains in bfloat16 and exports bfloat16 weights without scales or quantization_config, which
    transformers loads with the trained Megatron model's own log-probabilities (within bfloat16's distance)."""
    src = make_checkpoint("qwen3-moe", str(tmp_path / "fp8"), fp8_block=[16, 24])
    out = str(tmp_path / "trained")
    trained = _train_command(monkeypatch, "--model", src, "--tp", "2", "--moe-parallel", "ep", "--lr", "0.01",
                             "--out", out)
    assert "| bfloat16 (FP8 checkpoint, dequantised at load)" in capfd.readouterr().err
    cfg = json.load(open(f"{out}/config.json"))
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    tensors = load_file(f"{out}/model.safetensors")
    assert not any("scale" in n for n in tensors) and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    exported = reference_logprobs(out, PROMPTS)
    assert max_diff(exported, reference_logprobs(src, PROMPTS)) > 10 * BF16_TOL, "training changed too little"  # 2.2
    diff = max_diff(trained, exported)
    assert diff <= BF16_TOL, f"transformers on the bfloat16 export vs the trained Megatron model: {diff:.2e}"
