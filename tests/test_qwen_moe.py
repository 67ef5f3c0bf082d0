"""Qwen3-MoE and Qwen2-MoE in the core against transformers' own Qwen3MoeForCausalLM / Qwen2MoeForCausalLM
(float32, CPU, gloo).

Checkpoints: the tiny ``qwen3-moe`` preset (vocab 101: not divisible by 2 or 4; one KV head < t; head_dim
!= hidden / heads; q/k norm; 8 experts, top-3 renormalised; layers sparse, dense (mlp_only_layers), sparse)
and ``odd``: the same with 6 experts (not divisible by 4: TP-sharded experts at t = 4, whole experts at
t <= 2) and 4 layers, decoder_sparse_step 2 with mlp_only_layers [3] (dense, sparse, dense, dense); the
tiny ``qwen2-moe`` preset (qkv bias, tied embeddings, a sigmoid-gated shared expert of its own width 24,
top-2 not renormalised; layers dense, sparse, sparse) and ``qwen2-odd`` (its ``odd`` counterpart).
One rank launch per tp size (1, 2, 4) computes log-probabilities and gradients of every checkpoint x SP
on/off x MoE mode, and the negative controls; the tests below check the results.
"""
import dataclasses

import pytest
import torch

from sp_core.app.runtime import load_model, prompt_logprobs
from sp_core.models import ModelConfig
from support.checkpoints import make_checkpoint, reference_logprobs
from support.compare import max_diff, rel
from support.contexts import remake
from support.gradients import assert_tp1_gradients_equal_transformers, core_lm_gradients
from support.multirank import launches_per_tp, saved_bytes_on_every_rank

RAGGED = [[1, 5, 9, 3, 4], [7], [2, 8, 60, 11]]  # a packed ragged batch with a 1-token prompt
ONE_TOKEN = [[11]]  # T = 1 < t: ranks holding only SP padding
ODD = dict(num_experts=6, num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
CHECKPOINTS = ("qwen3-moe", "odd", "qwen2-moe", "qwen2-odd")
PRESET = {"qwen3-moe": "qwen3-moe", "odd": "qwen3-moe", "qwen2-moe": "qwen2-moe", "qwen2-odd": "qwen2-moe"}
SPARSE_LAYERS = {"qwen3-moe": (0, 2), "odd": (1,), "qwen2-moe": (1, 2), "qwen2-odd": (1,)}
MEMORY_TOKENS = 128
MEMORY_CHECKPOINTS = ("qwen3-moe", "qwen2-moe", "qwen3-moe-kv4", "qwen2-moe-kv4")
ROUTER = "model.layers.{}.mlp.gate.weight"
SHARED_GATE = "model.layers.{}.mlp.shared_expert_gate.weight"


EXPERTS = {"qwen3-moe": 8, "odd": ODD["num_experts"], "qwen2-moe": 8, "qwen2-odd": ODD["num_experts"]}


def _modes(name, tp):
    """MoE modes this checkpoint can run at ``tp``: expert parallelism needs the experts divisible by t."""
    return ("tp", "ep") if EXPERTS[name] % tp == 0 else ("tp",)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3moe")
    out = {name: make_checkpoint(PRESET[name], str(root / name), **(ODD if "odd" in name else {}))
           for name in CHECKPOINTS}
    # for the saved-bytes bound: whole KV heads per rank at t = 4 (fewer KV heads than t are replicated, and
    # their keys and values are saved on every rank)
    out.update({f"{name}-kv4": make_checkpoint(name, str(root / f"{name}-kv4"), num_key_value_heads=4)
                for name in ("qwen3-moe", "qwen2-moe")})
    return out


@pytest.fixture(scope="module")
def refs(dirs):
    return {name: [reference_logprobs(dirs[name], RAGGED), reference_logprobs(dirs[name], ONE_TOKEN)]
            for name in CHECKPOINTS}


def _without_renormalisation(model):
    """Negative control: every router's norm_topk_prob switched off (the top-k weights not renormalised)."""
    for module in model.modules():
        if hasattr(module, "load_expert_tensor"):
            module.gate.config = dataclasses.replace(module.gate.config, norm_topk_prob=False)
    return model


def _rank(dirs, tp):
    out = {"logprobs": {}, "grads": {}}
    for name in CHECKPOINTS:
        for sp in ((False, True) if tp > 1 else (False,)):
            remake(sequence_parallel=sp)
            for mode in _modes(name, tp):
                model = load_model(dirs[name], moe_parallel=mode)
                out["logprobs"][name, sp, mode] = [prompt_logprobs(model, RAGGED), prompt_logprobs(model, ONE_TOKEN)]
                out["grads"][name, sp, mode] = core_lm_gradients(model, RAGGED)
    remake(sequence_parallel=tp > 1)  # mode -> layer type -> bytes one layer saves for backward, on each rank
    out["saved_bytes"] = {(name, mode): saved_bytes_on_every_rank(dirs[f"{name}-kv4"], MEMORY_TOKENS, moe_parallel=mode)
                          for name in ("qwen3-moe", "qwen2-moe") for mode in _modes(name, tp)}
    out["memory"] = {}  # for sp-core memory's formula: experts split over TP, SP off and on, KV heads <, = heads
    for sp in ((False, True) if tp > 1 else (False,)):
        remake(sequence_parallel=sp)
        for name in MEMORY_CHECKPOINTS:
            out["memory"][name, sp] = saved_bytes_on_every_rank(dirs[name], MEMORY_TOKENS)
    if tp == 1:
        remake(sequence_parallel=False)
        out["unnormalised"] = prompt_logprobs(_without_renormalisation(load_model(dirs["qwen3-moe"])), RAGGED)
    if tp == 2:  # the gradient rule's control: the router's (and shared expert gate's) SP tag dropped, their
        # gradients are never summed
        remake(sequence_parallel=True)
        for name in ("qwen3-moe", "qwen2-moe"):
            for mode in ("tp", "ep"):
                model = load_model(dirs[name], moe_parallel=mode)
                for module in model.modules():
                    if hasattr(module, "load_expert_tensor"):
                        module.gate.weight.sequence_parallel = False
                        if module.shared_expert_gate is not None:
                            module.shared_expert_gate.weight.sequence_parallel = False
                out["unsummed", name, mode] = core_lm_gradients(model, RAGGED)
    return out


@pytest.fixture(scope="module")
def runs(dirs):
    return launches_per_tp(_rank, dirs)


def test_config_layer_types_and_routing(dirs):
    cfg = ModelConfig.from_pretrained(dirs["qwen3-moe"])
    assert cfg.layer_types == ("sparse", "dense", "sparse")
    assert (cfg.moe.n_routed_experts, cfg.moe.num_experts_per_tok, cfg.moe.topk_method, cfg.moe.norm_topk_prob,
            cfg.moe.n_shared_experts, cfg.qk_norm, cfg.qkv_bias, cfg.head_dim) == (8, 3, "softmax", True, 0, True,
                                                                                  False, 20)
    odd = ModelConfig.from_pretrained(dirs["odd"])
    assert odd.layer_types == ("dense", "sparse", "dense", "dense") and odd.moe.n_routed_experts == 6
    q2 = ModelConfig.from_pretrained(dirs["qwen2-moe"])
    assert q2.layer_types == ("dense", "sparse", "sparse")
    assert (q2.moe.n_routed_experts, q2.moe.num_experts_per_tok, q2.moe.norm_topk_prob, q2.moe.shared_size,
            q2.moe.shared_expert_gate, q2.qkv_bias, q2.qk_norm) == (8, 2, False, 24, True, True, False)
    assert ModelConfig.from_pretrained(dirs["qwen2-odd"]).layer_types == ("dense", "sparse", "dense", "dense")


BAD_CONFIG = [  # (key, value, what the one line says); the preset's config.json has num_local_experts 8
    ("num_experts", "8", '"num_experts" must be a non-negative integer or null'),
    ("num_local_experts", -1, '"num_local_experts" must be a non-negative integer or null'),
    ("num_experts", 6, "num_experts (6) and num_local_experts (8) disagree"),
    ("num_experts_per_tok", 0, '"num_experts_per_tok" must be a positive integer or null'),
    ("num_experts_per_tok", 9, "num_experts_per_tok (9) must lie in [1, num_experts = 8]"),
    ("moe_intermediate_size", 2.5, '"moe_intermediate_size" must be a positive integer or null'),
    ("decoder_sparse_step", 0, '"decoder_sparse_step" must be a positive integer or null'),
    ("norm_topk_prob", "yes", '"norm_topk_prob" must be true or false'),
    ("mlp_only_layers", 1, '"mlp_only_layers" must be a list of layer indices in [0, 3)'),
    ("mlp_only_layers", [3], '"mlp_only_layers" must be a list of layer indices in [0, 3)'),
    ("mlp_only_layers", [True], '"mlp_only_layers" must be a list of layer indices in [0, 3)'),
    ("shared_expert_intermediate_size", 0, '"shared_expert_intermediate_size" must be a positive integer or null'),
    ("qkv_bias", "yes", '"qkv_bias" must be true or false'),
]


@pytest.mark.parametrize("key,value,expected", BAD_CONFIG, ids=[f"{k}={v!r}" for k, v, _ in BAD_CONFIG])
def test_wrong_moe_config_is_refused_with_one_line(dirs, key, value, expected):
    import json
    import os

    from sp_core.models import ModelError

    with open(os.path.join(dirs["qwen3-moe"], "config.json")) as f:
        hf = json.load(f)
    hf[key] = value
    with pytest.raises(ModelError) as err:
        ModelConfig.from_dict(hf)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_all_dense_without_experts(dirs):
    """num_experts 0 (transformers: every layer dense) or every layer in mlp_only_layers: no MoE config."""
    import json
    import os

    with open(os.path.join(dirs["qwen3-moe"], "config.json")) as f:
        hf = json.load(f)
    for edit in (dict(num_local_experts=0), dict(mlp_only_layers=[0, 1, 2])):
        cfg = ModelConfig.from_dict(dict(hf, **edit))
        assert cfg.layer_types == ("dense",) * 3 and cfg.moe is None


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logprobs_equal_transformers(runs, refs, tp):
    got = runs(tp)["logprobs"]
    assert {(n, m) for n, _, m in got} == {(n, m) for n in CHECKPOINTS for m in _modes(n, tp)}
    for (name, sp, mode), batches in got.items():
        for batch, ref in zip(batches, refs[name]):
            assert [x.shape for x in batch] == [x.shape for x in ref]
            diff = max_diff(batch, ref)
            assert diff <= 1e-4, f"{name} tp={tp} sp={sp} moe={mode}: |d logprob| {diff}"
    for name in CHECKPOINTS:
        for i in range(2):
            if tp > 1:
                diff = max_diff(got[name, True, "tp"][i], got[name, False, "tp"][i])
                assert diff <= 1e-5, f"{name} tp={tp}: SP on vs off {diff}"
            if "ep" in _modes(name, tp):
                for sp in ((False, True) if tp > 1 else (False,)):
                    diff = max_diff(got[name, sp, "tp"][i], got[name, sp, "ep"][i])
                    assert diff <= 1e-5, f"{name} tp={tp} sp={sp}: MoE mode (a) vs (b) {diff}"


@pytest.mark.parametrize("tp", [2, 4])
def test_gradients_equal_tp1(runs, tp):
    base, got = runs(1)["grads"], runs(tp)["grads"]
    for (name, sp, mode), grads in got.items():
        ref = base[name, False, "tp"]
        assert grads.keys() == ref.keys()
        routers = [k for k in ref if k.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))]
        assert len(routers) == len(SPARSE_LAYERS[name]) * (2 if "qwen2" in name else 1), routers
        for key in routers:
            assert ref[key].abs().max() > 0, f"{key}: zero gradient at t=1 (a check that cannot fail)"
        for key in ref:
            assert rel(grads[key], ref[key]) <= 1e-5, f"{name} tp={tp} sp={sp} moe={mode}: gradient of {key}"


def test_tp1_gradients_equal_transformers_autograd(runs, dirs):
    base = runs(1)["grads"]
    for name in CHECKPOINTS:
        assert_tp1_gradients_equal_transformers(base[name, False, "tp"], dirs[name], RAGGED, name)


def test_negative_control_norm_topk_prob_ignored(runs, refs):
    """Routing weights not renormalised (as DeepSeek V2's greedy router does): the logits test would fail."""
    diff = max_diff(runs(1)["unnormalised"], refs["qwen3-moe"][0])
    assert diff > 1e-2, f"norm_topk_prob ignored: |d logprob| only {diff}"


def test_negative_control_router_gradient_not_summed(runs):
    """The gradient rule: under SP the router sees this rank's token shard, so its gradient must be summed
    over TP once; without its sequence_parallel tag it is rank 0's partial and differs from tp 1."""
    for name in ("qwen3-moe", "qwen2-moe"):
        base = runs(1)["grads"][name, False, "tp"]
        for mode in ("tp", "ep"):
            got, right = runs(2)["unsummed", name, mode], runs(2)["grads"][name, True, mode]
            for layer in SPARSE_LAYERS[name]:
                keys = [ROUTER.format(layer)] + ([SHARED_GATE.format(layer)] if "qwen2" in name else [])
                for key in keys:
                    assert rel(got[key], base[key]) > 1e-2, f"{name} moe={mode} {key}: unsummed gradient not caught"
                    assert rel(right[key], base[key]) <= 1e-5


@pytest.mark.parametrize("tp", [2, 4])
def test_saved_bytes_shrink_by_t(runs, tp):
    """Bytes one dense / one MoE layer saves for backward per rank with SP <= 1.05 x (t = 1 bytes) / t (expert
    parallelism: the mean over ranks, as a rank saves the rows routed to its own experts); the presets with 4
    KV heads (``sp-core memory --measure`` measures both layer types of an MoE Qwen)."""
    base, got = runs(1)["saved_bytes"], runs(tp)["saved_bytes"]
    for (name, mode), by_kind in got.items():
        assert set(by_kind) == {"dense", "sparse"}
        for kind, per_rank in by_kind.items():
            worst = (max(per_rank) if (kind, mode) != ("sparse", "ep") else sum(per_rank) / tp) / (base[name, "tp"][kind][0] / tp)
            assert worst <= 1.05, f"{name} {kind} layer, moe={mode}, tp={tp}: saved bytes {worst:.3f} x (t=1 bytes)/t"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_memory_formula_equals_measured_bytes(dirs, runs, tp):
    """`sp-core memory`'s formula for the MoE Qwens (norms, attention, the dense MLP or the MoE: top-k routed
    experts, router, Qwen2-MoE's shared expert and its gate) per layer type against the bytes ``--measure``
    measures on rank 0 (experts split over TP, T = 128), SP on and off, fewer KV heads than query heads (the
    presets: 1 and 2, replicated at t = 4) and as many (4): equal within 0.2 % (what the formula leaves out: the
    per-expert token counts, a few int32 / int64 values a layer)."""
    from sp_core.app.memory import report

    for (name, sp), got in runs(tp)["memory"].items():
        formula = report(ModelConfig.from_pretrained(dirs[name]), tp, MEMORY_TOKENS, sp)
        for kind, bytes_per_rank in got.items():
            want = formula["activation_bytes_per_layer_by_type"][kind]
            assert abs(bytes_per_rank[0] - want) <= 2e-3 * want, \
                f"{name} {kind} layer, tp={tp}, SP={sp}: measured {bytes_per_rank[0]}, formula {want}"


def test_memory_report_counts_dense_layers_among_moe_ones(dirs):
    """decoder_sparse_step 2 with mlp_only_layers [3]: layers dense, sparse, dense, dense; the whole model's bytes
    are the sum over its layers' types."""
    from sp_core.app.memory import report

    out = report(ModelConfig.from_pretrained(dirs["qwen2-odd"]), 2, 64, True)
    by_type = out["activation_bytes_per_layer_by_type"]
    assert out["layers_by_type"] == {"dense": 3, "sparse": 1}
    assert out["activation_bytes_all_layers"] == 3 * by_type["dense"] + by_type["sparse"]
    assert out["activation_bytes_per_layer"] == by_type["sparse"] > by_type["dense"]
