"""The MoE block against transformers' own DeepseekV2Moe / DeepseekV3MoE (same weights), float32:
outputs and input gradients <= 1e-5, every parameter's gradient <= 1e-5 relative (against transformers
and against the core at t = 1), at t = 1, 2, 4,
SP on and off, TP-sharded experts (a) and expert parallelism (b); (a) vs (b); collective counts; SP
padding never routed (NaN padding rows would poison the gradients, and the load counts are exact)."""
import contextlib
import math

import pytest
import torch

from sp_core import mpu
from sp_core.layers.moe import MoE
from sp_core.layers.router import Router, RouterConfig
from sp_core.layers.sharding import gather_full, load_full
from sp_core.mpu import collectives
from support.multirank import run_ranks
from support.contexts import default_with, remake

H, I, E = 8, 8, 8  # I/t = 2 at t = 4 is not 16-byte aligned: that case takes the per-expert GEMM loop
VARIANTS = {
    # V2, group-limited (group max), per-expert checkpoint form
    "v2": dict(top_k=3, n_shared=2, n_group=4, topk_group=2, method="group_limited_greedy", norm=False, scale=1.5),
    # V2-Lite-like greedy softmax; no shared expert; norm_topk_prob set, which transformers' V2 ignores
    "v2-greedy": dict(top_k=2, n_shared=0, n_group=1, topk_group=1, method="greedy", norm=True, scale=1.0),
    # V3, sigmoid + correction bias, fused checkpoint form
    "v3": dict(top_k=2, n_shared=1, n_group=4, topk_group=2, method="noaux_tc", norm=True, scale=2.5),
}
EXPECTED_COUNTS = {  # forward of one MoE layer
    ("a", True): {"all_gather": 1, "reduce_scatter": 1},
    ("a", False): {"all_reduce": 1},
    ("b", True): {"all_to_all": 4},
    ("b", False): {"all_reduce": 1},
}


def _hf_moe(variant: str):
    spec = VARIANTS[variant]
    common = dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=spec["top_k"],
                  n_shared_experts=spec["n_shared"], n_group=spec["n_group"], topk_group=spec["topk_group"],
                  routed_scaling_factor=spec["scale"], norm_topk_prob=spec["norm"], hidden_act="silu",
                  num_attention_heads=2, num_key_value_heads=2)
    if variant.startswith("v2"):
        from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        config = DeepseekV2Config(topk_method=spec["method"], **common)
        config._experts_implementation = "eager"  # transformers' per-expert loop: the independent reference
        module = DeepseekV2Moe(config)
    else:
        from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        config = DeepseekV3Config(**common)
        config._experts_implementation = "eager"
        module = DeepseekV3MoE(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        if variant == "v3":
            module.gate.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.1)
    return module.float()


def _router_config(variant: str) -> RouterConfig:
    s = VARIANTS[variant]
    return RouterConfig(E, s["top_k"], s["method"], s["n_group"], s["topk_group"], s["norm"], s["scale"])


def _reference(variant: str, tokens_list):
    """transformers' MoE on each batch (run here, in the test process, so the ranks need not import
    transformers): weights, inputs, upstream gradients, outputs, and every gradient, under HF names."""
    hf = _hf_moe(variant)
    weights = {name: t.detach().clone() for name, t in list(hf.named_parameters()) + list(hf.named_buffers())}
    cases = []
    for tokens in tokens_list:
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, H, generator=gen).requires_grad_(True)
        upstream = torch.randn(tokens, H, generator=gen)
        hf.zero_grad()
        out = hf(x[None])[0]
        (out * upstream).sum().backward()
        counts = torch.bincount(hf.gate(x.detach())[2].reshape(-1), minlength=E).float()
        grads = {name: p.grad.clone() for name, p in hf.named_parameters() if p.numel()}  # no empty shared MLP
        cases.append(dict(tokens=tokens, x=x.detach(), upstream=upstream, out=out.detach(), x_grad=x.grad,
                          grads=grads, counts=counts))
    return dict(variant=variant, weights=weights, cases=cases)


def _core_moe(ref, expert_parallel: bool) -> MoE:
    spec, w = VARIANTS[ref["variant"]], ref["weights"]
    moe = MoE(H, I, E, spec["top_k"], spec["n_shared"], _router_config(ref["variant"]), expert_parallel)
    assert len(moe.missing_expert_tensors()) == 3 * E
    load_full(moe.gate.weight, w["gate.weight"])
    if "gate.e_score_correction_bias" in w:
        moe.gate.e_score_correction_bias.copy_(w["gate.e_score_correction_bias"])
    if spec["n_shared"]:
        for proj in ("gate", "up"):
            load_full(moe.shared_experts.gate_up_proj.weight, w[f"shared_experts.{proj}_proj.weight"], proj)
        load_full(moe.shared_experts.down_proj.weight, w["shared_experts.down_proj.weight"])
    else:
        assert moe.shared_experts is None
    if ref["variant"] == "v3":  # transformers' in-memory (fused) form
        moe.load_expert_tensor("gate_up_proj", w["experts.gate_up_proj"])
        moe.load_expert_tensor("down_proj", w["experts.down_proj"])
    else:  # transformers' on-disk (per-expert) form
        for key, tensor in _per_expert(w["experts.gate_up_proj"], w["experts.down_proj"]).items():
            moe.load_expert_tensor(key, tensor)
    assert moe.missing_expert_tensors() == []
    return moe


def _per_expert(gate_up, down):
    out = {}
    for e in range(E):
        out[f"{e}.gate_proj.weight"], out[f"{e}.up_proj.weight"] = gate_up[e, :I], gate_up[e, I:]
        out[f"{e}.down_proj.weight"] = down[e]
    return out


def _close(got, want, what, rel=False):
    got, want = got.detach().float(), want.detach().float()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(want.abs().max().item(), 1e-30) if rel else 1.0
    assert err <= 1e-5 * scale, f"{what}: max |diff| {err:.3g} > {1e-5 * scale:.3g}"
    return err / scale


def _shard_with_nan_padding(x, num_tokens):
    """This rank's SP shard with its padding rows set to NaN: any padding row that reached the router or an
    expert would make a parameter gradient NaN (0 * NaN in the weight-gradient GEMM)."""
    shard = mpu.enter_sequence_parallel(x)
    rows = shard.shape[0]
    held = max(0, min(rows, num_tokens - mpu.default_context().rank * rows))
    is_pad = (torch.arange(rows) >= held)[:, None]
    return torch.where(is_pad, torch.full_like(shard, math.nan), shard)


def _all_checks(refs):
    t = mpu.default_context().size
    worst = {"out": 0.0, "grad": 0.0}
    for ref in refs:
        variant, k = ref["variant"], VARIANTS[ref["variant"]]["top_k"]
        for case in ref["cases"]:
            tokens = case["tokens"]
            outputs = {}
            for mode in ("a", "b"):
                moe = _core_moe(ref, expert_parallel=mode == "b")
                at_t1 = _core_at_t1(ref, case, expert_parallel=mode == "b")
                _compare_grads(at_t1, case["grads"], f"{variant} mode {mode} t=1 (in process) vs transformers")
                for sp in (True, False) if t > 1 else (False,):
                    what = f"{variant} mode {mode} t={t} SP {'on' if sp else 'off'} T={tokens}"
                    moe.zero_grad()
                    moe.gate.local_tokens_per_expert.zero_()
                    x = case["x"].clone().requires_grad_(True)
                    with mpu.default_context().sequence_parallel_for(sp):
                        shard = _shard_with_nan_padding(x, tokens) if sp else x
                        with mpu.counting_collectives() as issued:
                            out_shard = moe(shard, tokens)
                        if t > 1:
                            assert issued == EXPECTED_COUNTS[(mode, sp)], f"{what}: collectives {issued}"
                        out = mpu.exit_sequence_parallel(out_shard, tokens)
                        (out * case["upstream"]).sum().backward()
                        mpu.allreduce_sequence_parallel_grads(moe.parameters())
                    worst["out"] = max(worst["out"], _close(out, case["out"], f"{what}: output"))
                    outputs[(mode, sp)] = out.detach()
                    _close(x.grad, case["x_grad"], f"{what}: input gradient")
                    grads = _full_grads(moe)
                    worst["grad"] = max(worst["grad"], _compare_grads(grads, case["grads"], f"{what} vs transformers"),
                                        _compare_grads(grads, at_t1, f"{what} vs t=1"))
                    # load statistic: real tokens only (padding rows would add to it), summed over TP
                    counts = collectives.all_reduce(mpu.default_context(), moe.gate.local_tokens_per_expert.clone())
                    replicas = 1 if sp else t  # SP off: every rank routes every token
                    assert torch.equal(counts, case["counts"] * replicas), f"{what}: load counts {counts}"
                    assert counts.sum().item() == tokens * k * replicas
            for sp in (True, False) if t > 1 else (False,):
                _close(outputs[("a", sp)], outputs[("b", sp)], f"{variant} t={t} SP {sp}: mode (a) vs (b)")
    return worst


def _deterministic_expert_parallel(refs):
    """Mode (b) in the deterministic mode: SP on and off give torch.equal outputs (sglang switches SP per
    batch, Megatron does not), and SP off keeps transformers' outputs and gradients (the router and the
    shared experts run on every token; the scatter's backward gathers the rest). Collectives: SP off adds
    the all-gather of the results to the SP dispatch's four all-to-alls."""
    from sp_core.kernels import batch_invariant

    t = mpu.default_context().size
    remake(deterministic=True)
    try:
        for ref in refs:
            moe = _core_moe(ref, expert_parallel=True)
            for case in ref["cases"]:
                tokens, outs = case["tokens"], {}
                for sp in (True, False):
                    what = f"deterministic {ref['variant']} mode b t={t} SP {'on' if sp else 'off'} T={tokens}"
                    moe.zero_grad()
                    x = case["x"].clone().requires_grad_(True)
                    with mpu.default_context().sequence_parallel_for(sp), batch_invariant.gemms(True):
                        shard = _shard_with_nan_padding(x, tokens) if sp else x
                        with mpu.counting_collectives() as issued:
                            out_shard = moe(shard, tokens)
                        out = mpu.exit_sequence_parallel(out_shard, tokens)
                        (out * case["upstream"]).sum().backward()
                        mpu.allreduce_sequence_parallel_grads(moe.parameters())
                    outs[sp], counts = out.detach(), issued
                    _close(out, case["out"], f"{what}: output")
                    _close(x.grad, case["x_grad"], f"{what}: input gradient")
                    _compare_grads(_full_grads(moe), case["grads"], f"{what} vs transformers")
                assert torch.equal(outs[True], outs[False]), \
                    f"deterministic mode b t={t} T={tokens}: SP on != SP off, max |diff| " \
                    f"{(outs[True] - outs[False]).abs().max().item():.3g}"
                assert counts == {"all_to_all": 4, "all_gather": 1}, f"mode b t={t} SP off: collectives {counts}"
    finally:
        remake(deterministic=False)


def _full_grads(moe):
    """Every MoE parameter's gradient as the full transformers tensor, by transformers' name."""
    grads = {"gate.weight": moe.gate.weight.grad}
    if moe.shared_experts is not None:
        gate_up, down = moe.shared_experts.gate_up_proj.weight, moe.shared_experts.down_proj.weight
        pieces = gather_full(gate_up, gate_up.grad)
        pieces["down"] = gather_full(down, down.grad)[None]
        grads.update({f"shared_experts.{proj}_proj.weight": pieces[proj] for proj in ("gate", "up", "down")})
    experts = moe.export_expert_tensors(grads=True)
    grads["experts.gate_up_proj"] = torch.stack(
        [torch.cat([experts[f"{e}.gate_proj.weight"], experts[f"{e}.up_proj.weight"]]) for e in range(E)])
    grads["experts.down_proj"] = torch.stack([experts[f"{e}.down_proj.weight"] for e in range(E)])
    return grads


def _compare_grads(got, want, what):
    """Relative to the largest entry of each reference tensor; names every parameter (router gate included)."""
    assert sorted(got) == sorted(want), f"{what}: parameters {sorted(got)} != {sorted(want)}"
    return max(_close(got[name], want[name], f"{what}: {name} grad", rel=True) for name in want)


@contextlib.contextmanager
def _alone():
    """This process as t = 1 (no TP group) inside the block: the single-process baseline."""
    with default_with(group=None):
        yield


def _core_at_t1(ref, case, expert_parallel):
    with _alone():
        moe = _core_moe(ref, expert_parallel)
        x = case["x"].clone().requires_grad_(True)
        (moe(x, case["tokens"]) * case["upstream"]).sum().backward()
        return _full_grads(moe)


def _export_roundtrip_and_errors(ref):
    for mode in (False, True):
        moe = _core_moe(ref, expert_parallel=mode)
        exported = moe.export_expert_tensors()
        for key, want in _per_expert(ref["weights"]["experts.gate_up_proj"], ref["weights"]["experts.down_proj"]).items():
            assert torch.equal(exported[key], want), key
        with pytest.raises(ValueError, match=r"experts.3.up_proj.weight: shape \(8, 7\), expected \[8, 8\]"):
            moe.load_expert_tensor("3.up_proj.weight", torch.zeros(I, H - 1))
        with pytest.raises(KeyError, match="not a routed-expert tensor"):
            moe.load_expert_tensor("9.up_proj.weight", torch.zeros(I, H))
        # Megatron's attributes (its DDP, optimizer and finalize_model_grads read them)
        assert moe.gate.weight.sequence_parallel and not moe.gate.weight.tensor_model_parallel
        for param in (moe.experts.gate_up_proj, moe.experts.down_proj):
            if mode:  # whole experts: Megatron's expert-parameter marker, no TP split, no SP sum
                assert param.allreduce is False and param.expert_parallel and param.tensor_model_parallel and param.partition_dim == 0
                assert not getattr(param, "sequence_parallel", False)
            else:
                assert param.tensor_model_parallel and param.partition_dim == (1 if param is moe.experts.gate_up_proj else 2)
        shared = moe.shared_experts.gate_up_proj.weight
        assert (shared.sequence_parallel and not shared.tensor_model_parallel) if mode else shared.tensor_model_parallel
    with pytest.raises(ValueError, match=r"n_routed_experts \(6\) is not divisible by the tensor-parallel size 4.*"
                                         r"use TP-sharded experts"):
        MoE(H, I, 6, 2, 1, RouterConfig(6, 2, "greedy"), expert_parallel=True)


def _saved_bytes(moe, x, num_tokens):
    """Bytes of the distinct non-parameter storages autograd saves for backward in one MoE forward."""
    params = {p.untyped_storage().data_ptr() for p in moe.parameters()}
    storages = {}

    def pack(saved):
        if saved.untyped_storage().data_ptr() not in params:
            storages[saved.untyped_storage().data_ptr()] = saved.untyped_storage().nbytes()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        moe(x, num_tokens)
    return sum(storages.values())


def _saved_bytes_ratio(expert_parallel):
    """Saved bytes per rank with SP at t over (bytes at t = 1) / t, for a V3-like MoE with a realistic
    hidden-to-intermediate shape (tiny H would let the per-slot routing indices dominate)."""
    t, tokens, hidden, inter = mpu.default_context().size, 64 * mpu.default_context().size, 256, 64
    config = RouterConfig(16, 4, "noaux_tc", 4, 2, True, 2.5)
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden)
    with mpu.default_context().sequence_parallel_for(True):
        shard = mpu.enter_sequence_parallel(x).clone().requires_grad_(True)  # own storage, as a layer output
        at_t = _saved_bytes(MoE(hidden, inter, 16, 4, 1, config, expert_parallel), shard, tokens)
    with _alone():
        at_1 = _saved_bytes(MoE(hidden, inter, 16, 4, 1, config, expert_parallel), x.requires_grad_(True), tokens)
    return at_t / (at_1 / t)


def _new_operators():
    """all_to_all_tp and gather_from_sp_packed against single-process math (every rank can build every
    rank's data), forward and backward, with empty splits and mixed dtypes."""
    t, r = mpu.default_context().size, mpu.default_context().rank
    def rows(src, dst):  # rows src sends to dst; some are 0
        return (src + 2 * dst) % 3

    def data(src):  # src's rows, grouped by destination; each row says (src, dst, i)
        return torch.tensor([[100. * src + 10 * dst + i, -1.] for dst in range(t) for i in range(rows(src, dst))]
                            ).view(-1, 2)

    def upstream(dst):
        return torch.randn(sum(rows(s, dst) for s in range(t)), 2, generator=torch.Generator().manual_seed(dst))

    x = data(r).requires_grad_(True)
    got = mpu.all_to_all_tp(x, [rows(r, d) for d in range(t)], [rows(s, r) for s in range(t)])
    want = torch.cat([data(s)[sum(rows(s, d) for d in range(r)):][:rows(s, r)] for s in range(t)])
    assert torch.equal(got, want), "all_to_all_tp forward"
    got.backward(upstream(r))
    want_grad = torch.cat([upstream(d)[sum(rows(s, d) for s in range(r)):][:rows(r, d)] for d in range(t)])
    assert torch.equal(x.grad, want_grad), "all_to_all_tp backward"

    hidden = [torch.randn(2, 3, generator=torch.Generator().manual_seed(10 + k)) for k in range(t)]
    weights = [torch.randn(2, 2, generator=torch.Generator().manual_seed(20 + k)) for k in range(t)]
    ids = [torch.randint(0, 9, (2, 2), generator=torch.Generator().manual_seed(30 + k), dtype=torch.int32) for k in range(t)]
    h, w = hidden[r].to(torch.bfloat16).requires_grad_(True), weights[r].clone().requires_grad_(True)
    gh, gw, gi = mpu.gather_from_sp_packed(h, w, ids[r])
    assert torch.equal(gh, torch.cat(hidden).to(torch.bfloat16)) and torch.equal(gw, torch.cat(weights))
    assert torch.equal(gi, torch.cat(ids)) and gi.dtype == torch.int32 and not gi.requires_grad
    up_h = [torch.randn(2 * t, 3, generator=torch.Generator().manual_seed(40 + k)) for k in range(t)]
    up_w = [torch.randn(2 * t, 2, generator=torch.Generator().manual_seed(50 + k)) for k in range(t)]
    (gh.float() * up_h[r]).sum().add_((gw * up_w[r]).sum()).backward()
    shard = slice(2 * r, 2 * r + 2)
    torch.testing.assert_close(h.grad.float(), sum(u.to(torch.bfloat16).float() for u in up_h)[shard], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w.grad, sum(up_w)[shard], atol=1e-6, rtol=1e-6)


def _bfloat16_forward(ref):
    """A bfloat16 model (the correction bias stays float32) against transformers' float32 output: mixed
    dtypes through the packed gather and the all-to-all, bf16 grouped GEMMs."""
    case, worst = ref["cases"][0], 0.0
    for expert_parallel in (False, True):
        moe = _core_moe(ref, expert_parallel).to(torch.bfloat16)
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
        for sp in (True, False):
            with mpu.default_context().sequence_parallel_for(sp), torch.no_grad():
                x = case["x"].to(torch.bfloat16)
                out = mpu.exit_sequence_parallel(moe(mpu.enter_sequence_parallel(x), case["tokens"]), case["tokens"])
            err = ((out.float() - case["out"]).abs().max() / case["out"].abs().max()).item()
            assert err <= 2e-2, f"bf16 expert_parallel={expert_parallel} SP {sp}: relative error {err:.3g}"
            worst = max(worst, err)
    return worst


def _checks_and_memory(refs):
    if mpu.default_context().size > 1:
        _new_operators()
    worst = _all_checks(refs)
    if mpu.default_context().size > 1:
        worst["bf16"] = _bfloat16_forward(refs[-1])
        _deterministic_expert_parallel(refs)
    if mpu.default_context().size == 4:
        _export_roundtrip_and_errors(refs[-1])
    if mpu.default_context().size > 1:
        worst["saved_a"] = _saved_bytes_ratio(expert_parallel=False)
        worst["saved_b"] = _saved_bytes_ratio(expert_parallel=True)
        assert worst["saved_a"] <= 1.05, f"mode (a) saves {worst['saved_a']:.3f} x (t=1 bytes)/t"
        # mode (b): this rank's share of the routed rows varies with the routing (imbalance)
        assert worst["saved_b"] <= 1.25, f"mode (b) saves {worst['saved_b']:.3f} x (t=1 bytes)/t"
    return worst


@pytest.mark.parametrize("world,tokens", [(1, (5,)), (2, (7,)), (4, (3, 9))])
def test_moe_matches_transformers(world, tokens):
    """T=3 at t=4: a rank holding only padding; T=7, 9: ragged shards. At t > 1 also: bytes saved for
    backward with SP in mode (a) <= 1.05 x (t = 1 bytes) / t; at t = 4 the expert export round trip and
    bad input."""
    refs = [_reference(variant, tokens) for variant in VARIANTS]
    worst = run_ranks(world, _checks_and_memory, refs)
    print(f"t={world}: worst output |diff| {worst[0]['out']:.2e}, worst relative gradient diff "
          f"{worst[0]['grad']:.2e}, saved bytes / (t=1 bytes / t) per rank: mode (a) "
          f"{[round(w.get('saved_a', 1), 3) for w in worst]}, mode (b) {[round(w.get('saved_b', 1), 3) for w in worst]}, "
          f"bf16 relative output error {worst[0].get('bf16', 0):.2e}")


def test_router_config_errors():
    with pytest.raises(ValueError, match="topk_method 'top2' is not supported; supported: greedy, group_limited"):
        RouterConfig(8, 2, "top2")
    with pytest.raises(ValueError, match=r"n_group \(3\) must divide n_routed_experts \(8\)"):
        RouterConfig(8, 2, "noaux_tc", n_group=3, topk_group=1)
    with pytest.raises(ValueError, match="needs >= 2 experts per group, got 8 experts in 8 groups"):
        RouterConfig(8, 2, "noaux_tc", n_group=8, topk_group=2)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) exceeds the 4 experts in the topk_group \(2\)"):
        RouterConfig(8, 5, "group_limited_greedy", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\) must be between 1 and n_routed_experts \(8\)"):
        RouterConfig(8, 9, "greedy")
    RouterConfig(8, 2, "greedy", n_group=3, topk_group=5)  # greedy ignores the groups, as transformers' V2


def test_padding_control_routing_the_padded_shard_is_caught():
    """Negative control for the NaN-padding check above: a router fed the padded rows does give NaN
    gradients and extra load counts."""
    router = Router(H, _router_config("v3"))
    x = torch.cat([torch.randn(3, H), torch.full((1, H), math.nan)])
    ids, weights = router(x)
    (weights[:3].sum()).backward()
    assert torch.isnan(router.weight.grad).any()
    assert router.local_tokens_per_expert.sum().item() == 4 * 2


def test_correction_bias_stays_float32():
    router = Router(H, _router_config("v3")).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.local_tokens_per_expert.dtype == torch.float32
    assert router.expert_bias is router.e_score_correction_bias
