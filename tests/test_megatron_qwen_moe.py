"""Qwen3-MoE and Qwen2-MoE trained inside real megatron-core through the Megatron adapter (its DDP,
schedules, finalize_model_grads and optimizer; gloo, float32): the engine's log-probabilities equal
transformers', training at t = 2 (both MoE modes with SP, and SP off) equals t = 1 (losses, step-0
gradients, Megatron's grad norm), and the export of the trained model loads in transformers with the trained
model's own log-probabilities. One rank launch per world size.

The steps use Megatron's SGD: with Adam the step-0 losses, gradients and grad norm agree to 1e-7 relative, but
later steps drift apart (qwen3-moe at t = 2, SP: grad norm 2e-6, 4e-5, 6e-5 relative at steps 1-3), Adam's
per-parameter normalisation amplifying float32 rounding in near-zero gradients; with SGD every step holds 1e-5,
which a gradient summed wrongly after step 0 (parameters out of step over TP) would still break."""
import pytest
import torch

from sp_core.app.tiny import PROMPTS, make_checkpoint, reference_logprobs
from support.compare import max_diff, rel
from support.multirank import run_ranks

ARCHS = ("qwen3-moe", "qwen2-moe")
STEPS = 4


def _settings(tp):
    if tp == 1:
        return [(a, "tp", False) for a in ARCHS]
    return [(a, m, True) for a in ARCHS for m in ("tp", "ep")] + [(a, "tp", False) for a in ARCHS]


def _train_every_setting(dirs, tp, export_root):
    from megatron.core import parallel_state

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
        if export_root and sp:
            model.eval()
            run["logprobs"] = engine.model_logprobs(model, PROMPTS)
            export_hf_checkpoint(model, f"{export_root}/{arch}-{mode}")
        out[(arch, mode, sp)] = run if mpu.default_context().rank == 0 else None
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron-qwen-moe")
    return {name: make_checkpoint(name, str(root / name)) for name in ARCHS}


@pytest.fixture(scope="module")
def launches(dirs, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("megatron-qwen-moe-out"))
    return {"root": root, 2: run_ranks(2, _train_every_setting, dirs, 2, root, timeout=600)[0],
            1: run_ranks(1, _train_every_setting, dirs, 1, None, timeout=600)[0]}


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
