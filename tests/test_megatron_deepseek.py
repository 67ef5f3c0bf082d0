"""DeepSeek V2 / V2-Lite / V3 / V3.2 trained inside real megatron-core (its DDP, schedules,
finalize_model_grads and optimizer): t = 2 equals t = 1 in both MoE modes, the export loads in
transformers, Megatron's aux-loss-free bias update runs on the core's router, SP padding is routed
nowhere. One rank launch per world size runs every architecture and mode (Megatron's groups are rebuilt
per mode). On CPU: gloo, float32. On CUDA (``test_training_equality_on_gpu``): NCCL, bfloat16 and float32."""

import os
import re

import pytest
import torch

from sp_core.app.cli import main
from sp_core.app.tiny import PROMPTS, make_checkpoint, reference_logprobs
from support.compare import max_diff, rel
from support.multirank import run_ranks

ARCHS = ("deepseek-v2", "deepseek-v2-lite", "deepseek-v3", "deepseek-v32")
STEPS = 5
BIAS_RATE = 1e-2  # Megatron's moe_router_bias_update_rate, large enough to move the bias in two steps


def _settings(tp):
    """(arch, moe mode, SP) runs at this tp: both MoE modes with SP; V3 also SP off (Megatron's #1699 case)."""
    if tp == 1:
        return [(a, "tp", False) for a in ARCHS]
    return [(a, m, True) for a in ARCHS for m in ("tp", "ep")] + [("deepseek-v3", m, False) for m in ("tp", "ep")]


def _fresh_groups():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _exported(arch, mode, sp):
    """The runs whose trained model is exported and compared with transformers: every architecture with
    TP-sharded experts, and V3 with expert parallelism."""
    return sp and (mode == "tp" or arch == "deepseek-v3")


def _train_every_setting(dirs, tp, dtype, export_root):
    """In each rank: every setting of ``_settings(tp)`` for STEPS steps; rank 0 returns losses and step-0
    gradients (HF names, full tensors); with ``export_root`` the ``_exported`` runs also export and return
    the trained model's own log-probabilities of PROMPTS, and every rank the collectives its export issued."""
    from sp_core import mpu
    from sp_core_megatron.cli_engine import cpu_training, engine, training
    from sp_core_megatron.export import export_hf_checkpoint

    cpu_training.enable()
    out = {}
    for arch, mode, sp in _settings(tp):
        _fresh_groups()
        model = engine.build_model(dirs[arch], tp, sp, dtype, mode)
        untrained = engine.model_logprobs(model.eval(), PROMPTS)  # `sp-core logits --engine megatron`'s path
        model.train()
        norms = []
        _, losses, grads = training.train(model, STEPS, clip_grad=engine.clip_grad_default(),
                                          capture_step0_grads=True, grad_norms=norms)
        run = {"losses": losses, "grads0": grads, "grad_norms": norms, "untrained": untrained}
        if export_root and _exported(arch, mode, sp):
            model.eval()
            run["logprobs"] = engine.model_logprobs(model, PROMPTS)
            with mpu.counting_collectives() as issued:
                export_hf_checkpoint(model, f"{export_root}/{arch}-{mode}")
            run["export_issued"] = dict(issued)
        out[(arch, mode, sp)] = run if mpu.default_context().rank == 0 else {"export_issued": run.get("export_issued")}
    return out


def _every_check(dirs, tp, dtype, root):
    """One rank launch per world size: the training runs, and on CPU the router bias, the dist checkpoint
    (saved at t = 2, loaded at t = 1: run t = 2 first) and megatron.core's GPTModel with the core's layers."""
    out = {"runs": _train_every_setting(dirs, tp, dtype, f"{root}/export" if tp == 2 else None)}
    if root is not None:
        out["bias"] = _router_bias_and_padding(dirs["deepseek-v3"], tp, f"{root}/bias-t{tp}")
        saving = tp == 2
        out["dist"] = _dist_checkpoint(dirs["deepseek-v3"], tp, "ep" if saving else "tp",
                                       f"{root}/dist" if saving else None, None if saving else f"{root}/dist")
        if tp == 2:
            out["gpt_model"] = _gpt_model_logprobs(dirs, tp)
    return out


def _router_bias_and_padding(model_dir, tp, export_dir):
    """Megatron's aux-loss-free update (moe_router_enable_expert_bias) on the core's router, and the load
    count of one batch whose last SP shard holds a padding row."""
    from sp_core_megatron.cli_engine import cpu_training, engine, training
    from sp_core_megatron.export import export_hf_checkpoint

    cpu_training.enable()
    _fresh_groups()
    model = engine.build_model(model_dir, tp, tp > 1, torch.float32, "tp", moe_router_enable_expert_bias=True,
                               moe_router_bias_update_rate=BIAS_RATE)
    routers = [m for m in model.modules() if hasattr(m, "local_tokens_per_expert")]
    before = [r.expert_bias.clone() for r in routers]
    training.train(model, 2, clip_grad=0.0)
    after = [r.expert_bias.clone() for r in routers]
    export_hf_checkpoint(model, export_dir)
    # 15 tokens (b = 1, s = 15) over t ranks: the last shard ends in padding rows
    for r in routers:
        r.local_tokens_per_expert.zero_()
    model.train()
    ids = torch.arange(15).unsqueeze(0) % model.language_model.config.vocab_size
    with torch.no_grad():
        model(ids, torch.arange(15).unsqueeze(0), None, labels=ids)
    from sp_core.mpu import collectives

    counted = [float(collectives.all_reduce(model.parallel, r.local_tokens_per_expert.clone()).sum()) for r in routers]
    return {"before": before, "after": after, "counted": counted, "top_k": routers[0].config.top_k}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron-deepseek")
    return {name: make_checkpoint(name, str(root / name)) for name in ARCHS}


def _check_equal(base, got, tol, what, relative_loss=False):
    """Losses within ``tol`` (absolute; relative to the loss with ``relative_loss``) and every step-0 gradient
    within ``tol`` relative to its largest entry. Returns the worst values seen."""
    worst_loss = max(abs(a - b) / (abs(b) if relative_loss else 1.0) for a, b in zip(got["losses"], base["losses"]))
    assert worst_loss <= tol, f"{what}: losses {got['losses']} vs {base['losses']}"
    assert got["grads0"].keys() == base["grads0"].keys(), f"{what}: {set(got['grads0']) ^ set(base['grads0'])}"
    worst_grad = max((rel(got["grads0"][k], g), k) for k, g in base["grads0"].items())
    assert worst_grad[0] <= tol, f"{what}: step-0 gradient of {worst_grad[1]} off by {worst_grad[0]:.2e} relative"
    # Megatron's gradient norm (clipping's input) counts every parameter once: expert-parallel experts on
    # every rank, replicated ones once
    for a, b in zip(got["grad_norms"], base["grad_norms"]):
        assert abs(a - b) <= tol * b, f"{what}: Megatron's grad norm {got['grad_norms']} vs {base['grad_norms']}"
    return worst_loss, worst_grad


@pytest.fixture(scope="module")
def launches(dirs, tmp_path_factory):
    """The two rank launches (t = 2 first: it saves the dist checkpoint that t = 1 loads)."""
    root = str(tmp_path_factory.mktemp("megatron-deepseek-out"))
    os.makedirs(f"{root}/dist")  # Megatron's dist_checkpointing.save wants the directory to exist
    two = run_ranks(2, _every_check, dirs, 2, torch.float32, root, timeout=600)
    one = run_ranks(1, _every_check, dirs, 1, torch.float32, root, timeout=600)[0]
    return {"root": root, 1: one, 2: two[0], "other_rank": two[1]}


def test_training_at_tp2_equals_tp1_and_round_trip(dirs, launches):
    from safetensors.torch import load_file

    base, got, other_rank = launches[1]["runs"], launches[2]["runs"], launches["other_rank"]["runs"]
    for arch, mode, sp in _settings(2):
        ref = base[(arch, "tp", False)]
        assert ref["losses"][-1] < ref["losses"][0], f"{arch}: the loss should fall on the built-in stream"
        _check_equal(ref, got[(arch, mode, sp)], 1e-5, f"{arch} moe={mode} SP={sp}")
    # a gradient rule broken for one parameter family must show: every family has a non-zero gradient here
    grads = base[("deepseek-v3", "tp", False)]["grads0"]
    for piece in ("mlp.gate.weight", "mlp.experts.0.gate_proj", "kv_a_proj_with_mqa", "q_a_layernorm"):
        assert any(piece in k and grads[k].abs().max() > 0 for k in grads), piece
    # round trip: the export of the trained model (one writer; per-expert tensors and the router bias under
    # the checkpoint's own names) loads in transformers and gives the trained model's own log-probabilities
    for arch, mode, sp in filter(lambda s: _exported(*s), _settings(2)):
        out = f"{launches['root']}/export/{arch}-{mode}"
        assert set(other_rank[(arch, mode, sp)]["export_issued"]) == {"gather"}, "TP rank 1 only sends its slices"
        assert load_file(f"{out}/model.safetensors").keys() == load_file(f"{dirs[arch]}/model.safetensors").keys()
        mine = got[(arch, mode, sp)]["logprobs"]
        diff = max_diff(mine, reference_logprobs(out, PROMPTS))
        assert diff <= 1e-5, f"{arch} moe={mode}: transformers on the export vs the trained Megatron model: {diff:.2e}"


def test_megatron_logprobs_equal_transformers(dirs, launches):
    """The megatron engine's log-probabilities (what `sp-core logits --engine megatron` writes) at t = 1 and
    t = 2, SP on and off, both MoE modes, against transformers."""
    for tp in (1, 2):
        for (arch, mode, sp), run in launches[tp]["runs"].items():
            ref = reference_logprobs(dirs[arch], PROMPTS)
            diff = max_diff(run["untrained"], ref)
            assert diff <= 1e-4, f"{arch} t={tp} moe={mode} SP={sp}: {diff:.2e} vs transformers"


def test_router_bias_update_exports_and_padding_counts_nowhere(launches):
    """Megatron's update moves the bias the same way at t = 1 and t = 2 (token counts summed over TP); the
    export carries it; 15 real tokens x top-k are counted whatever the SP padding."""
    from safetensors.torch import load_file

    one, two = launches[1]["bias"], launches[2]["bias"]
    assert all((a - b).abs().max() > 0 for a, b in zip(one["after"], one["before"])), "the bias did not move"
    for a, b in zip(one["after"], two["after"]):
        assert torch.equal(a, b), "t = 2 moved the bias differently from t = 1"
    assert one["counted"] == two["counted"] == [15.0 * one["top_k"]] * len(one["counted"])
    exported = load_file(f"{launches['root']}/bias-t2/model.safetensors")
    assert torch.equal(exported["model.layers.1.mlp.gate.e_score_correction_bias"], two["after"][0])


DP_RUNS = {"ddp": dict(optimizer="sgd", lr=0.5),  # SGD: Adam's update would hide a gradient's scale
           "distributed optimizer": dict(optimizer="adam", lr=1e-2, distributed_optimizer=True)}  # Adam only


def _dp_runs():
    """Megatron's distributed optimizer wraps CUDA tensors only (cpu_training's "not covered")."""
    from sp_core.mpu import platform

    return [name for name in DP_RUNS if platform.device_type() == "cuda" or name == "ddp"]


def _data_parallel_runs(model_dir, tp, micro_batch_size):
    """V3 trained 3 steps on the global batch of 4 sequences, each DP rank on its share: with Megatron's DDP
    (losses and step-0 gradients) and with its distributed optimizer (losses; each rank holds only its shard
    of the gradients). t = 1: one rank; t = 2: TP 2 x DP 2 with the core's expert parallelism."""
    from sp_core import mpu
    from sp_core_megatron.cli_engine import cpu_training, engine, training

    cpu_training.enable()
    out = {}
    for name in _dp_runs():
        settings = DP_RUNS[name]
        _fresh_groups()
        model = engine.build_model(model_dir, tp, tp > 1, torch.float32, "ep" if tp > 1 else "tp")
        _, losses, grads = training.train(model, 3, micro_batch_size=micro_batch_size, clip_grad=0.0,
                                          capture_step0_grads=name == "ddp", **settings)
        out[name] = {"losses": losses, "grads0": grads}
    return out if mpu.default_context().rank == 0 else None


@pytest.mark.parametrize("tp", [2, 1])
def test_data_parallel_with_expert_parallelism_and_the_distributed_optimizer(dirs, tp):
    """TP 2 x DP 2 (4 ranks) with the core's expert parallelism, Megatron's DDP and its distributed optimizer:
    the same losses and step-0 gradients as one rank on the whole global batch. Expert gradients are reduced
    over Megatron's expert data-parallel group (the DP ranks that hold the same experts), the rest over DP.
    On CPU the DDP run only (``_dp_runs``). TP 1 x DP 2 (experts whole on every rank) is for 2-GPU machines."""
    from sp_core.mpu import platform

    if tp == 1 and platform.device_type() == "cpu":
        pytest.skip("TP 1 x DP 2 runs on 2-GPU machines; on CPU TP 2 x DP 2 covers DDP")
    one = run_ranks(1, _data_parallel_runs, dirs["deepseek-v3"], 1, 4, timeout=600)[0]
    ranks = run_ranks(2 * tp, _data_parallel_runs, dirs["deepseek-v3"], tp, 2, tp=tp, timeout=600)
    for name in _dp_runs():
        assert one[name]["losses"][-1] < one[name]["losses"][0] - 1e-2, f"{name}: the loss should fall"
        for replica in (ranks[0], ranks[tp]):  # the leaders of the two TP groups: both report the global loss
            diff = max(abs(a - b) for a, b in zip(replica[name]["losses"], one[name]["losses"]))
            assert diff <= 1e-5, f"DP 2 x TP {tp}, {name}: losses {replica[name]['losses']} vs one rank {one[name]['losses']}"
        print(f"DP 2 x TP {tp}, {name}: losses {ranks[0][name]['losses']} (one rank: {one[name]['losses']})", flush=True)
    got, ref = ranks[0]["ddp"]["grads0"], one["ddp"]["grads0"]
    assert got.keys() == ref.keys()
    worst = max((rel(got[k], g), k) for k, g in ref.items())
    assert worst[0] <= 1e-5, f"DP 2 x TP {tp}: step-0 gradient of {worst[1]} off by {worst[0]:.2e} relative"


def test_dist_checkpoint_of_expert_parallel_training_loads_with_experts_split_over_tp(dirs, launches):
    """Saved at t = 2 with whole experts per rank (after two steps that also moved the router bias), loaded
    at t = 1 with TP-split experts: the trained model's own log-probabilities come back."""
    trained, loaded = launches[2]["dist"], launches[1]["dist"]
    untrained = reference_logprobs(dirs["deepseek-v3"], PROMPTS)
    assert max_diff(trained, untrained) > 1e-3, "training changed nothing"
    diff = max_diff(loaded, trained)
    assert diff <= 1e-5, f"the dist checkpoint reloaded at t = 1: {diff:.2e}"


def test_gpt_model_with_core_deepseek_layer_spec_equals_transformers(dirs, launches):
    """megatron.core's own GPTModel with the core's DeepSeek layers (ModuleSpec) at t = 2 with SP."""
    for arch in ARCHS:
        got = launches[2]["gpt_model"][arch]
        diff = max_diff(got, reference_logprobs(dirs[arch], PROMPTS))
        assert diff <= 1e-4, f"{arch}: GPTModel + the core's layers (tp 2, SP) vs transformers: {diff:.2e}"


def test_checkpoint_check_names_expert_tensors(dirs, tmp_path):
    """The pre-start check reads expert tensors too: a missing expert and a wrong expert shape are one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sp_core.app.engines import check_model
    from sp_core.models import ModelError

    check_model(dirs["deepseek-v2-lite"], 2, "ep")
    bad = tmp_path / "bad"
    shutil.copytree(dirs["deepseek-v2-lite"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.1.mlp.experts.5.down_proj.weight"] = tensors["model.layers.1.mlp.experts.5.down_proj.weight"][:, :8].contiguous()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError) as err:
        check_model(str(bad), 2)
    line = str(err.value)
    assert "\n" not in line and "missing: model.layers.1.mlp.experts.3.up_proj.weight" in line
    assert "wrong shape: model.layers.1.mlp.experts.5.down_proj.weight [64, 8] (expected [64, 16])" in line


def test_train_command_with_expert_parallelism_exports_for_transformers(dirs, tmp_path, capfd):
    """`sp-core train` on a DeepSeek checkpoint, as a user types it (V2-Lite: plain q_proj, greedy routing)."""
    out = str(tmp_path / "trained")
    assert main(["train", "--model", dirs["deepseek-v2-lite"], "--tp", "2", "--moe-parallel", "ep", "--steps", "2",
                 "--seq-length", "16", "--out", out]) == 0
    err = capfd.readouterr().err
    assert "tp 2 | sequence parallel on" in err and "step 2/2 | loss " in err
    ref = reference_logprobs(out, PROMPTS)  # transformers loads the per-expert export
    assert len(ref) == len(PROMPTS) and all(torch.isfinite(r).all() for r in ref)


def test_unsupported_moe_settings_fail_at_start_up(dirs):
    """One line each: a capacity factor, an expert-parallel layout other than the two the core has, and
    Megatron's bias update on a router without a bias (V2). These checks need no process group."""
    from sp_core.models import ModelConfig, ModelError
    from sp_core_megatron import transformer_config_from_hf
    from sp_core_megatron.config import check_supported, check_supported_for_model

    errors = []
    for overrides in (dict(moe_expert_capacity_factor=1.25),
                      dict(expert_model_parallel_size=2, expert_tensor_parallel_size=2),
                      dict(moe_router_enable_expert_bias=True)):
        config = transformer_config_from_hf(dirs["deepseek-v2"], tp=2, sequence_parallel=True)
        for name, value in overrides.items():
            object.__setattr__(config, name, value)
        with pytest.raises(ModelError) as err:
            check_supported(config)
            check_supported_for_model(config, ModelConfig.from_pretrained(dirs["deepseek-v2"]))
        errors.append(str(err.value))
    assert all("\n" not in e for e in errors), errors
    assert "dropless" in errors[0] and "moe_expert_capacity_factor=1.25" in errors[0]
    assert "expert_model_parallel_size=2 with expert_tensor_parallel_size=2" in errors[1]
    assert "e_score_correction_bias" in errors[2]


_GPU_BASELINES = {}  # dtype -> the t = 1 runs, shared by the t = 2 and t = 4 comparisons


def _gpu_baseline(dirs, dtype: str):
    key = (dtype, dirs["deepseek-v32"])
    if key not in _GPU_BASELINES:
        _GPU_BASELINES[key] = run_ranks(1, _train_every_setting, dirs, 1, getattr(torch, dtype), None, timeout=600)[0]
    return _GPU_BASELINES[key]


# bfloat16: a sample per seed of the built-in stream, BF16_STEPS steps each. One bf16 sample says little: a
# flipped router choice (or V3.2 key selection) moves a token's whole gradient, so one run's distance from
# float32 is a draw (V3.2's q_b_proj gradient: 1.5e-1 at t = 1, 3.9e-1 at t = 2 in one call, within bounds
# in two others; 4 x H200). The check compares means over the seeds.
BF16_SEEDS = (1234, 7, 8, 9)
BF16_STEPS = 3
BF16_ARCHS = ARCHS + ("deepseek-v32-all-keys",)  # V3.2 also with index_topk 64 >= the 32-token sequences


def _bf16_settings(tp):
    return _settings(tp) + [("deepseek-v32-all-keys", m, sp) for a, m, sp in _settings(tp) if a == "deepseek-v32"]


def _with_all_keys(dirs):
    dense = os.path.join(os.path.dirname(dirs["deepseek-v32"]), "deepseek-v32-all-keys")
    if not os.path.isdir(dense):
        make_checkpoint("deepseek-v32", dense, index_topk=64)
    return dict(dirs, **{"deepseek-v32-all-keys": dense})


def _train_samples(dirs, settings, tp, dtype, without_sp_grad_sum=False):
    """In each rank: each (arch, mode, SP) of ``settings`` once per seed of BF16_SEEDS, BF16_STEPS steps; rank
    0 returns {setting: [{"losses", "grads0"} per seed]}. ``without_sp_grad_sum`` plants a bug for the
    negative control: Megatron's finalize_model_grads leaves SP-tagged gradients unsummed over TP."""
    from sp_core import mpu
    from sp_core_megatron.cli_engine import cpu_training, engine, training

    cpu_training.enable()
    if without_sp_grad_sum:
        import sys

        import megatron.core.distributed  # noqa: F401  (its finalize_model_grads names the function, not the module)

        finalize = sys.modules["megatron.core.distributed.finalize_model_grads"]
        finalize._allreduce_non_tensor_model_parallel_grads = lambda *args, **kwargs: None
    out = {}
    for arch, mode, sp in settings:
        out[(arch, mode, sp)] = []
        for seed in BF16_SEEDS:
            _fresh_groups()
            model = engine.build_model(dirs[arch], tp, sp, dtype, mode)
            _, losses, grads = training.train(model, BF16_STEPS, clip_grad=engine.clip_grad_default(),
                                              capture_step0_grads=True, seed=seed)
            out[(arch, mode, sp)].append({"losses": losses, "grads0": grads})
    return out if mpu.default_context().rank == 0 else None


def _bf16_baselines(dirs):
    """float32 and bfloat16 samples at t = 1 (the reference and bfloat16's own distance from it)."""
    key = ("bf16-samples", dirs["deepseek-v32"])
    if key not in _GPU_BASELINES:
        _GPU_BASELINES[key] = {dtype: run_ranks(1, _train_samples, dirs, _bf16_settings(1), 1, dtype, timeout=600)[0]
                               for dtype in (torch.float32, torch.bfloat16)}
    return _GPU_BASELINES[key]


_ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


def _bf16_units(grads):
    """Step-0 gradients as the bfloat16 check compares them: each tensor alone, except the routed experts,
    concatenated per layer and projection (``layers.1.mlp.experts.*.gate_proj.weight``)."""
    units = {}
    for key in sorted(grads, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")]):
        units.setdefault(_ROUTED_EXPERT.sub(".mlp.experts.*.", key), []).append(grads[key].flatten())
    return {unit: torch.cat(parts) for unit, parts in units.items()}


def _l2_rel(a, b) -> float:
    """||a - b|| / ||b|| in float32 (b all zero: ||a - b||, over 1e-30)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _mean_distances(samples, refs):
    """Means over the seeds of each sample's distance from float32 t = 1 on the same seed: the first steps'
    largest relative loss difference ("loss") and each gradient unit's L2 distance."""
    out = {}
    for sample, ref in zip(samples, refs):
        out.setdefault("loss", []).append(max(abs(a - b) / abs(b) for a, b in zip(sample["losses"], ref["losses"])))
        want = _bf16_units(ref["grads0"])
        for unit, got in _bf16_units(sample["grads0"]).items():
            out.setdefault(unit, []).append(_l2_rel(got, want[unit]))
    return {key: sum(values) / len(values) for key, values in out.items()}


BF16_FLOOR = 1e-2  # below this, a distance from float32 passes whatever bfloat16 t = 1 reached


def _check_bf16_no_worse_than_t1(ref32, own, got, what):
    """bfloat16 at t > 1 adds no error beyond bfloat16's own: averaged over the seeds, its first BF16_STEPS
    losses and each step-0 gradient are no further from float32 t = 1 than max(BF16_FLOOR, 2 x bfloat16 t = 1's
    mean distance), gradients in L2 (a max-entry measure follows the one token whose choice flipped). Routed
    experts are compared per layer and projection, all experts together (a flipped choice moves a small
    expert's gradient; a TP-SP error in the expert path shows in every expert; each expert alone is held to
    1e-5 by the float32 run). Returns the unit with the least margin: (name, got's mean, t = 1's mean)."""
    mine, single = _mean_distances(got, ref32), _mean_distances(own, ref32)
    assert mine.keys() == single.keys(), f"{what}: {set(mine) ^ set(single)}"
    worst = max(mine, key=lambda k: mine[k] / max(BF16_FLOOR, 2 * single[k]))
    assert mine[worst] <= max(BF16_FLOOR, 2 * single[worst]), \
        f"{what}: {worst} {mine[worst]:.2e} from float32 t=1 (bfloat16 t=1: {single[worst]:.2e}; mean of {len(got)} seeds)"
    return worst, mine[worst], single[worst]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_training_equality_on_gpu(dirs, tp, dtype):
    """The same equality on CUDA devices (NCCL): float32 against t = 1 within 1e-5; bfloat16 no further from
    float32 t = 1 than bfloat16 at t = 1 is, over several seeds (``_check_bf16_no_worse_than_t1``), V3.2 with
    its sparse selection and with every key kept."""
    from sp_core.mpu import platform

    if platform.device_type() != "cuda":
        pytest.skip("needs CUDA devices (NCCL); the CPU equality runs in test_training_at_tp2_equals_tp1_and_round_trip")
    if dtype == "float32":
        base = _gpu_baseline(dirs, dtype)
        got = run_ranks(tp, _train_every_setting, dirs, tp, torch.float32, None, timeout=600)[0]
        for arch, mode, sp in _settings(tp):
            what = f"{arch} moe={mode} SP={sp} t={tp} {dtype}"
            loss, (grad, name) = _check_equal(base[(arch, "tp", False)], got[(arch, mode, sp)], 1e-5, what)
            print(f"{what}: max loss difference {loss:.2e}, worst step-0 grad {grad:.2e} ({name})", flush=True)
        return
    dirs = _with_all_keys(dirs)
    base = _bf16_baselines(dirs)
    got = run_ranks(tp, _train_samples, dirs, _bf16_settings(tp), tp, torch.bfloat16, timeout=600)[0]
    for arch, mode, sp in _bf16_settings(tp):
        what = f"{arch} moe={mode} SP={sp} t={tp} bfloat16"
        ref32, own = base[torch.float32][(arch, "tp", False)], base[torch.bfloat16][(arch, "tp", False)]
        name, mine, single = _check_bf16_no_worse_than_t1(ref32, own, got[(arch, mode, sp)], what)
        print(f"{what}: least margin {name}: {mine:.2e} from float32 t=1 (bfloat16 t=1: {single:.2e}), "
              f"loss {_mean_distances(got[(arch, mode, sp)], ref32)['loss']:.2e}", flush=True)


def test_bf16_check_catches_unsummed_sp_gradients_on_gpu(dirs):
    """Negative control of the bfloat16 check: the same t = 2 runs with Megatron's sum of SP-tagged gradients
    over TP switched off (what a missing ``sequence_parallel`` tag does) fail it."""
    from sp_core.mpu import platform

    if platform.device_type() != "cuda":
        pytest.skip("needs CUDA devices (NCCL): it controls test_training_equality_on_gpu's bfloat16 check")
    dirs = _with_all_keys(dirs)
    base = _bf16_baselines(dirs)
    setting = ("deepseek-v3", "tp", True)
    got = run_ranks(2, _train_samples, dirs, [setting], 2, torch.bfloat16, True, timeout=600)[0]
    with pytest.raises(AssertionError) as err:
        _check_bf16_no_worse_than_t1(base[torch.float32][("deepseek-v3", "tp", False)],
                                     base[torch.bfloat16][("deepseek-v3", "tp", False)], got[setting], "planted")
    print(f"planted bug caught: {err.value}", flush=True)


def _gpt_model_logprobs(dirs, tp):
    """megatron.core's own GPTModel with the core's DeepSeek layers (ModuleSpec), weights by HF name."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from sp_core.layers import gather_vocab
    from sp_core_megatron import (get_sp_core_block_spec, gpt_model_args, load_hf_into_gpt_model,
                                  transformer_config_from_hf)
    from sp_core_megatron.cli_engine import cpu_training

    cpu_training.enable()
    out = {}
    for arch in ARCHS:
        _fresh_groups()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        config = transformer_config_from_hf(dirs[arch], tp=tp, sequence_parallel=True)
        model = GPTModel(config, get_sp_core_block_spec(config.num_layers), **gpt_model_args(config))
        load_hf_into_gpt_model(model, dirs[arch])
        out[arch] = []
        with torch.no_grad():
            for prompt in PROMPTS:
                padded = prompt + [0] * (-len(prompt) % tp)  # Megatron's SP needs s divisible by tp (causal)
                logits = model(torch.tensor([padded]), torch.arange(len(padded)).unsqueeze(0), None)[0]
                out[arch].append(torch.log_softmax(gather_vocab(logits, config.vocab_size), -1)[: len(prompt)])
    return out


def _dist_checkpoint(model_dir, tp, mode, save_dir=None, load_dir=None):
    """Megatron's dist_checkpointing: save after two training steps (bias updated too), or load; returns
    the model's log-probabilities of PROMPTS."""
    from megatron.core import dist_checkpointing

    from sp_core_megatron.cli_engine import cpu_training, engine, training

    cpu_training.enable()
    _fresh_groups()
    model = engine.build_model(model_dir, tp, tp > 1, torch.float32, mode, moe_router_enable_expert_bias=True,
                               moe_router_bias_update_rate=BIAS_RATE)
    if load_dir:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), load_dir))
    else:
        training.train(model, 2, clip_grad=0.0)
        dist_checkpointing.save(model.sharded_state_dict(), save_dir)
    model.eval()
    return engine.model_logprobs(model, PROMPTS)


# -- V3.2: documents packed by THD or by Megatron's block-diagonal attention_mask ----------------------

V32_DOCS = [[3, 17, 42, 8, 61, 5, 9], [2, 77, 12, 30, 4, 4, 50, 6]]  # 7 + 8 tokens, both > index_topk (3)


def _block_diagonal(lens):
    """Megatron's mask of documents of ``lens`` in one row (True = masked out) and their positions."""
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    return ~allowed, torch.cat([torch.arange(n) for n in lens])


def _v32_packed_logprobs(model_dir, tp):
    """The two documents in one row packed by THD and by the block-diagonal attention mask, and a batch of two
    rows (b = 2: the documents in either order, a mask per row), SP off and (t > 1) on: {(sp, form): log-probs
    [15 or 2 x 15, V]}, rows in V32_DOCS order."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from sp_core.layers import gather_vocab
    from sp_core_megatron.cli_engine import engine

    lens = [len(d) for d in V32_DOCS]
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    (mask, positions), (mask2, positions2) = _block_diagonal(lens), _block_diagonal(lens[::-1])
    ids = torch.tensor([sum(V32_DOCS, []), sum(V32_DOCS[::-1], [])])
    rows_masks, rows_positions = torch.stack([mask, mask2]).unsqueeze(1), torch.stack([positions, positions2])
    out = {}
    for sp in sorted({False, tp > 1}):
        _fresh_groups()
        model = engine.build_model(model_dir, tp, sp).eval()
        vocab = model.language_model.config.vocab_size
        with torch.no_grad():
            forms = {"thd": model(ids[:1], None, None, packed_seq_params=packed)[0],
                     "mask": model(ids[:1], positions[None], mask[None, None])[0]}
            two = model(ids, rows_positions, rows_masks)
            forms["mask b=2"] = torch.cat([two[0], two[1, lens[1]:], two[1, :lens[1]]])
            for form, logits in forms.items():
                out[(sp, form)] = torch.log_softmax(gather_vocab(logits, vocab).float(), -1)
    return out


def _in_float16_module(model_dir):
    """A bf16 model wrapped as Megatron-LM's --bf16 wraps it (Float16Module calls module.bfloat16()): the
    indexers' weights_proj weights by HF name, and the log-probs of the longer document through the wrapper."""
    from megatron.core.transformer.module import Float16Module

    from sp_core.layers import gather_vocab
    from sp_core_megatron.cli_engine import engine

    _fresh_groups()
    inner = engine.build_model(model_dir, 1, False, torch.bfloat16)
    model = Float16Module(inner.config, inner).eval()
    projs = {name: p.detach().clone() for name, p in inner.language_model.named_parameters() if "weights_proj" in name}
    doc = V32_DOCS[1]
    with torch.no_grad():
        logits = model(torch.tensor([doc]), torch.arange(len(doc))[None], None)[0]
    return projs, torch.log_softmax(gather_vocab(logits, inner.language_model.config.vocab_size).float(), -1)


def _v32_rank(model_dir, tp):
    """In each rank: ``_v32_packed_logprobs``, and at t = 1 ``_in_float16_module``; rank 0 returns them."""
    from sp_core import mpu
    from sp_core_megatron.cli_engine import cpu_training

    cpu_training.enable()
    out = {"packed": _v32_packed_logprobs(model_dir, tp)}
    if tp == 1:
        out["float16_module"] = _in_float16_module(model_dir)
    return out if mpu.default_context().rank == 0 else None


@pytest.fixture(scope="module")
def v32_runs(dirs):
    return {tp: run_ranks(tp, _v32_rank, dirs["deepseek-v32"], tp)[0] for tp in (1, 2)}


def test_v32_mask_packed_documents_equal_each_document_alone(dirs, v32_runs):
    """The indexer picks its top-k among the keys Megatron's attention_mask leaves (as transformers adds the
    mask to the index scores before top-k): the mask-packed row equals THD packing and each document alone
    in transformers, t = 1 and 2, SP on and off."""
    ref = torch.cat(reference_logprobs(dirs["deepseek-v32"], V32_DOCS))
    ref = {"thd": ref, "mask": ref, "mask b=2": torch.cat([ref, ref])}
    diffs = {f"t={tp} SP={sp} {form}": float((got - ref[form]).abs().max())
             for tp, run in v32_runs.items() for (sp, form), got in run["packed"].items()}
    print("V3.2 packed, max |d logprob| vs each document alone:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert len(diffs) == 9 and max(diffs.values()) <= 1e-4, diffs


def test_v32_weights_proj_stays_float32_in_float16_module(dirs, v32_runs):
    """Megatron-LM's --bf16 (Float16Module: module.bfloat16()) leaves the indexer's weights_proj float32 and
    bit-equal to the checkpoint (bf16 head weights could flip index-score gaps of ~7e-4); the wrapped model
    still runs: finite, and within bf16 error of transformers' float32 on the rows before index_topk (every
    key kept there)."""
    from safetensors.torch import load_file

    from support.precision import BF16_REL

    projs, logprobs = v32_runs[1]["float16_module"]
    weights = {k: v for k, v in load_file(f"{dirs['deepseek-v32']}/model.safetensors").items() if "weights_proj" in k}
    assert sorted(projs) == sorted(weights), (sorted(projs), sorted(weights))
    for name, weight in projs.items():
        assert weight.dtype == torch.float32, f"{name} is {weight.dtype} under Float16Module"
        assert torch.equal(weight, weights[name]), f"{name} lost precision under Float16Module"
    ref = reference_logprobs(dirs["deepseek-v32"], V32_DOCS[1:])[0]
    assert logprobs.isfinite().all()
    dense = slice(0, 3)  # index_topk: these rows keep every key
    error = ((logprobs[dense] - ref[dense]).norm() / ref[dense].norm()).item()
    assert error <= BF16_REL, f"bf16 under Float16Module vs float32 transformers: relative error {error:.2e}"
