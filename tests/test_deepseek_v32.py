"""DeepSeek V3.2 (DSA indexer + sparse MLA) in the core against transformers' DeepseekV32ForCausalLM
(float32, CPU, gloo).

One rank launch per tp size (1, 2, 4) computes everything that tp needs -- log-probabilities SP on / off,
LM-loss gradients, gradients of a loss on the index scores (the tags' test), the indexer's FLOPs, and at
t = 2 collective counts and the negative controls -- and the tests below check the results.
"""
import json
import os

import pytest
import torch

from sp_core import mpu
from sp_core.mpu import platform
from sp_core.app.runtime import load_model, pack, prompt_logprobs
from support.checkpoints import make_checkpoint, reference_logprobs, with_edited_config
from support.compare import max_diff, rel
from support.gradients import core_lm_gradients, transformers_lm_gradients
from support.index_scores import hf_index_scores
from support.multirank import collective_log, launches_per_tp, saved_bytes_on_every_rank
from support.precision import assert_bf16_matches_float32
from support.contexts import remake, single_process

INDEX_TOPK = 3  # the tiny V3.2's (sp_core.app.tiny)
# a ragged packed batch straddling index_topk: 9 and 6 tokens (sparse rows), exactly 3, 2 and 1 (dense);
# 21 tokens, so t = 2 and 4 pad
LONG = [[1, 5, 9, 3, 4, 17, 22, 40, 3], [7], [2, 8, 60], [5, 6, 7, 8, 9, 10], [12, 13]]
SHORT = [[1, 5, 9], [7], [2, 8]]  # every sequence <= index_topk: V3's attention, no scoring
FLOP_PROMPTS = [list(range(1, 17)), list(range(30, 38))]  # 24 tokens: the same rows per rank at t = 1, 2, 4
MEMORY_TOKENS = 128


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("v32")
    v32 = make_checkpoint("deepseek-v32", str(root / "v32"))
    # the same weights as a V3 checkpoint: no indexer tensors, V3's architecture
    v3 = root / "v3"
    v3.mkdir()
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(os.path.join(v32, "model.safetensors")).items() if ".indexer." not in k}
    save_file(weights, str(v3 / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((root / "v32" / "config.json").read_text())
    for key in ("index_topk", "index_n_heads", "index_head_dim", "layer_types"):
        cfg.pop(key, None)
    cfg.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    (v3 / "config.json").write_text(json.dumps(cfg))
    return {"v32": v32, "v3": str(v3), "log": str(root / "collectives.log")}


@pytest.fixture(scope="module")
def hf(dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dirs["v32"], dtype=torch.float32)


@pytest.fixture(scope="module")
def refs(dirs):
    return {"long": reference_logprobs(dirs["v32"], LONG), "short": reference_logprobs(dirs["v32"], SHORT)}


def _sp():
    return mpu.default_context().sequence_parallel_active


def _inputs(model, prompts):
    """Embedded tokens (this rank's shard under SP), all positions, local positions, batch, all row ids."""
    ids, positions, batch = pack(prompts, platform.current_device())
    if _sp():
        ids, positions = mpu.pad_1d(ids), mpu.pad_1d(positions)
    local = mpu.scatter_to_sp(positions) if _sp() else positions
    rows = torch.arange(positions.shape[0], device=positions.device)
    return model.model.embed_tokens(ids), positions, local, batch, (mpu.scatter_to_sp(rows) if _sp() else rows)


def _lm_gradients(model):
    """Full gradient of every parameter after one LM-loss backward, and whether the indexer got none."""
    grads = core_lm_gradients(model, LONG)
    return grads, all(p.grad is None for n, p in model.named_parameters() if ".indexer." in n)


def score_loss_weights(rows, total):
    """Fixed coefficients of the test's loss on the index scores, by (batch row, key row)."""
    return torch.sin(0.37 * rows[:, None].float() + 0.11 * torch.arange(total, device=rows.device)[None, :].float() + 1)


def _score_loss_gradients(model):
    """Gradients of the indexer's parameters from sum(c * scores) over every layer's indexer (the form a
    loss that trains the indexer takes): as the parameters' tags sum them, unsummed, and summed always."""
    from sp_core.mpu import collectives

    model.zero_grad(set_to_none=True)
    embedded, positions, local, batch, rows = _inputs(model, LONG)
    weights = score_loss_weights(rows, positions.shape[0])
    for layer in model.model.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(embedded.detach())
        q_latent = attn.latent(x, local)[:, : attn.q_lora_rank]
        scores = attn.indexer.scores(x, q_latent, local, batch)
        (torch.where(scores.isfinite(), scores, 0.0) * weights).sum().backward()
    params = {n: p for n, p in model.named_parameters() if ".indexer." in n}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in params)  # inputs detached
    raw = {n: p.grad.clone() for n, p in params.items()}
    mpu.allreduce_sequence_parallel_grads(params.values())
    return {"tagged": {n: p.grad.clone() for n, p in params.items()}, "unsummed": raw,
            "always_summed": {n: collectives.all_reduce(mpu.default_context(), g) for n, g in raw.items()}}


def _indexer_inputs(model, prompts):
    """Layer 1's indexer and its arguments (normed hidden, query latent, local positions, batch) for ``prompts``."""
    layer = model.model.layers[1]
    attn = layer.self_attn
    with torch.no_grad():
        embedded, _, local, batch, _ = _inputs(model, prompts)
        x = layer.input_layernorm(embedded)
        return attn.indexer, (x, attn.latent(x, local)[:, : attn.q_lora_rank], local, batch)


def _indexer_flops(model):
    """FLOPs of one layer's indexer forward on this rank (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    indexer, args = _indexer_inputs(model, FLOP_PROMPTS)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        selected = indexer(*args)
    assert selected is not None and selected.shape == (24, INDEX_TOPK)
    return counter.get_total_flops()


def _rank(dirs, tp):
    out = {"logprobs": {}, "v3_short": {}, "grads": {}, "lm_untouched": {}, "score_grads": {}, "flops": {}}
    for sp in ((False, True) if tp > 1 else (False,)):
        remake(sequence_parallel=sp)
        model = load_model(dirs["v32"])
        out["logprobs"][sp] = {"long": prompt_logprobs(model, LONG), "short": prompt_logprobs(model, SHORT)}
        out["v3_short"][sp] = prompt_logprobs(load_model(dirs["v3"]), SHORT)
        out["grads"][sp], out["lm_untouched"][sp] = _lm_gradients(model)
        out["score_grads"][sp] = _score_loss_gradients(model)
        out["flops"][sp] = _indexer_flops(model)
    remake(sequence_parallel=tp > 1)
    # one sequence longer than index_topk: sparse attention
    out["saved_bytes"] = saved_bytes_on_every_rank(dirs["v32"], MEMORY_TOKENS)
    if tp > 1:  # the serving dtype, SP on
        remake(sequence_parallel=True)
        model = load_model(dirs["v32"], dtype=torch.bfloat16)
        out["bf16"] = prompt_logprobs(model, LONG)
    if tp == 2:
        out["tags"] = {n: (getattr(p, "sequence_parallel", False), getattr(p, "tensor_model_parallel", False),
                           p.dtype) for n, p in model.named_parameters() if ".indexer." in n}
        out["counts"] = _collective_counts(dirs)
        remake(sequence_parallel=True)
        out["blocks"] = _selection_in_row_blocks(load_model(dirs["v32"]))
    return out


def _selection_in_row_blocks(model):
    """The selection scored in blocks of one query row (a long context's memory bound) vs in one block."""
    from sp_core.layers import indexer

    layer_indexer, args = _indexer_inputs(model, LONG)
    with torch.no_grad():
        whole = layer_indexer(*args)
        saved, indexer.SCORE_BLOCK_BYTES = indexer.SCORE_BLOCK_BYTES, 1
        try:
            rows = layer_indexer(*args)
        finally:
            indexer.SCORE_BLOCK_BYTES = saved
    return whole, rows


def _collective_counts(dirs):
    """Collectives of one forward of layer 1's attention (op -> count) and the shapes it all-gathered."""
    from sp_core.mpu import collectives

    out = {}
    with collective_log(dirs["log"]) as gathered_by:
        for sp in (True, False):
            remake(sequence_parallel=sp)
            for arch in ("v32", "v3"):
                model = load_model(dirs[arch])
                for name, prompts in (("long", LONG), ("short", SHORT)):
                    embedded, positions, _, batch, _ = _inputs(model, prompts)
                    layer = model.model.layers[1]
                    with torch.no_grad(), mpu.counting_collectives() as counts:
                        _, gathered = gathered_by(lambda: layer.self_attn(layer.input_layernorm(embedded), positions,
                                                                          batch))
                    out[arch, sp, name] = (dict(counts), gathered)
                embedded, positions, _, batch, _ = _inputs(model, LONG)
                with mpu.counting_collectives() as counts:  # forward and backward: the indexer adds no backward op
                    layer.self_attn(layer.input_layernorm(embedded), positions, batch).sum().backward()
                out[arch, sp, "backward"] = dict(counts)
    return out


@pytest.fixture(scope="module")
def runs(dirs):
    return launches_per_tp(_rank, dirs)


def test_index_score_margins_leave_room(hf):
    """The sparse comparisons mean something only if no row's k-th and (k+1)-th visible key are a near-tie:
    transformers' own scores on the test prompts and on `sp-core verify`'s (its selection is checked to be
    their top-k)."""
    from sp_core.app.tiny import PROMPTS

    captured = []
    hooks = [layer.self_attn.indexer.register_forward_hook(
        lambda m, args, out: captured.append((m, args, out))) for layer in hf.model.layers]
    gaps = []
    try:
        with torch.no_grad():
            for p in LONG + PROMPTS:
                captured.clear()
                hf(torch.tensor([p]))
                for indexer, args, selected in captured:
                    cos, sin = args[2]
                    scores = hf_index_scores(indexer, args[0][0], args[1][0], cos[0], sin[0])
                    for row in range(len(p)):
                        top = scores[row].topk(min(INDEX_TOPK, len(p))).indices
                        assert set(top.tolist()) == set(selected[0, row].tolist())
                        if row >= INDEX_TOPK:  # more visible keys than index_topk: a real choice
                            ordered = scores[row, : row + 1].sort(descending=True).values
                            gaps.append((ordered[INDEX_TOPK - 1] - ordered[INDEX_TOPK]).item())
    finally:
        for h in hooks:
            h.remove()
    print(f"index-score margin (k-th vs (k+1)-th visible key), smallest of {len(gaps)} sparse rows: {min(gaps):.3e}")
    assert len(gaps) == 2 * (6 + 3 + 2 + 2) and min(gaps) >= 1e-4


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logprobs_equal_transformers(runs, refs, tp):
    ref = refs
    got = runs(tp)["logprobs"]
    for sp, batches in got.items():
        for name, batch in batches.items():
            assert [x.shape for x in batch] == [x.shape for x in ref[name]]
            diff = max_diff(batch, ref[name])
            assert diff <= 1e-4, f"tp={tp} sp={sp} {name}: |d logprob| {diff}"
    if tp > 1:
        for name in ("long", "short"):
            assert max_diff(got[True][name], got[False][name]) <= 1e-5, f"tp={tp} {name}: SP on vs off"


def test_sparse_attention_changes_the_result(runs, dirs):
    """Negative control: the long prompts' sparse rows differ from dense attention (index_topk >= len)."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dirs["v32"], dtype=torch.float32, index_topk=64)
    with torch.no_grad():
        ref = [torch.log_softmax(dense(torch.tensor([p])).logits[0], -1) for p in LONG]
    got = runs(1)["logprobs"][False]["long"]
    assert max_diff(got[:1], ref[:1]) > 1e-1  # 9 tokens, rows 3.. sparse
    assert max_diff([g[:INDEX_TOPK] for g in got], [r[:INDEX_TOPK] for r in ref]) <= 1e-4  # dense rows agree


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_short_sequences_give_v3_exactly(runs, tp):
    """Every sequence <= index_topk: V3.2 = V3 with the same weights, bit for bit (scoring skipped)."""
    got = runs(tp)
    for sp in got["v3_short"]:
        for a, b in zip(got["logprobs"][sp]["short"], got["v3_short"][sp]):
            assert torch.equal(a, b), f"tp={tp} sp={sp}"


def test_tp1_gradients_equal_transformers_autograd(runs, hf):
    """LM-loss gradients of every parameter at t = 1 against transformers' autograd; the indexer gets none
    there (top-k is discrete; transformers runs it under no-grad) and none in the core."""
    hf_grads = transformers_lm_gradients(hf, LONG)
    indexer = [k for k in hf_grads if ".indexer." in k]
    assert len(indexer) == 2 * 5 and all(hf_grads[k] is None for k in indexer)
    hf_grads.update((k, torch.zeros_like(hf.get_parameter(k))) for k in indexer)
    run = runs(1)
    core = run["grads"][False]
    assert core.keys() == hf_grads.keys() and run["lm_untouched"][False]
    for key, grad in core.items():
        if ".indexer." not in key:
            assert grad.abs().max() > 0, key
        assert rel(grad, hf_grads[key]) <= 1e-5, f"t=1 vs transformers: {key}"


@pytest.mark.parametrize("tp", [2, 4])
def test_gradients_equal_tp1(runs, tp):
    base = runs(1)["grads"][False]
    got = runs(tp)
    for sp, grads in got["grads"].items():
        assert grads.keys() == base.keys() and got["lm_untouched"][sp], f"tp={tp} sp={sp}"
        for key, ref in base.items():
            assert rel(grads[key], ref) <= 1e-5, f"tp={tp} sp={sp}: gradient of {key}"


def test_score_loss_gradients_tp1_equal_transformers(runs, hf):
    """The differentiable index scores at t = 1 against transformers' score math on its own modules."""
    ids = torch.tensor([tok for p in LONG for tok in p])
    total = ids.shape[0]
    weights = score_loss_weights(torch.arange(total), total)
    hf.zero_grad(set_to_none=True)
    start = 0
    for p in LONG:
        tokens = torch.tensor([p])
        positions = torch.arange(len(p))[None]
        for layer in hf.model.layers:
            with torch.no_grad():
                x = layer.input_layernorm(hf.model.embed_tokens(tokens))[0]
                q_resid = layer.self_attn.q_a_layernorm(layer.self_attn.q_a_proj(x))
                cos, sin = hf.model.rotary_emb(x[None], positions)
            scores = hf_index_scores(layer.self_attn.indexer, x, q_resid, cos[0], sin[0])
            c = weights[start:start + len(p), start:start + len(p)]
            (torch.where(scores.isfinite(), scores, 0.0) * c).sum().backward()
        start += len(p)
    core = runs(1)["score_grads"][False]["tagged"]
    assert len(core) == 10
    for key, grad in core.items():
        ref = hf.get_parameter(key).grad
        assert ref.abs().max() > 0 and rel(grad, ref) <= 1e-5, key


@pytest.mark.parametrize("tp", [2, 4])
def test_score_loss_gradients_and_tags(runs, tp):
    """Each rank scores its own rows, so the indexer's gradients are per-rank partials that the
    ``sequence_parallel`` tags sum (SP on); with SP off the indexer is replicated and nothing is summed.
    Negative controls: not summing under SP, or summing a replicated indexer (t x), is caught."""
    base = runs(1)["score_grads"][False]["tagged"]
    got = runs(tp)["score_grads"]
    for sp, grads in got.items():
        for key, ref in base.items():
            assert rel(grads["tagged"][key], ref) <= 1e-5, f"tp={tp} sp={sp}: {key}"
            wrong = grads["unsummed"][key] if sp else grads["always_summed"][key]
            assert rel(wrong, ref) > 1e-2, f"tp={tp} sp={sp}: a wrong tag on {key} not caught"
            if not sp:
                assert rel(wrong, tp * ref) <= 1e-5  # summing the replicated indexer: t x the gradient
    if tp == 2:
        tags = runs(2)["tags"]  # of a bfloat16 model
        assert len(tags) == 10 and all(sp and not partitioned for sp, partitioned, _ in tags.values()), tags
        assert all((dtype == torch.float32) == ("weights_proj" in n) for n, (_, _, dtype) in tags.items()), tags


def test_bfloat16_and_row_blocks(runs, refs):
    """A bfloat16 model keeps weights_proj in float32 (the tags test) and runs at t = 2 with SP. Its rows
    before index_topk (no selection) stay near the float32 reference; later rows may select other keys
    (the tiny model's margins, ~0.07, are within bf16 rounding of its scores), so they are only printed.
    Scoring in blocks of one query row selects exactly what one block does, padding and short rows included."""
    run = runs(2)
    ref = refs["long"]
    assert all(x.isfinite().all() for x in run["bf16"])
    dense_rows = max_diff([x[:INDEX_TOPK] for x in run["bf16"]], [r[:INDEX_TOPK] for r in ref])
    print(f"bfloat16 at t=2 SP: max |d logprob| vs float32 transformers {dense_rows:.3e} before index_topk, "
          f"{max_diff(run['bf16'], ref):.3e} over all rows")
    assert dense_rows <= 0.3
    whole, rows = run["blocks"]
    assert whole.dtype == torch.int32 and whole.shape == (22, INDEX_TOPK) and torch.equal(whole, rows)
    assert (whole[21] == -1).all() and (whole[9] == torch.tensor([9, -1, -1], dtype=torch.int32)).all()


@pytest.mark.parametrize("tp", [2, 4])
def test_bfloat16_close_to_float32_reference_with_equal_greedy_tokens(runs, refs, tp):
    """V3.2 in bf16 at t = 2 / 4 with SP (sequences longer than index_topk: sparse attention) against float32
    transformers: relative error <= 1e-2, greedy tokens equal where float32 decides clearly. Measured on
    NCCL (4 x H200): 7.0e-3 at t = 2, 7.4e-3 at t = 4. On gloo (CPU) at t = 4 the rows after index_topk reach
    4.6e-2 with a flipped greedy token: the tiny model's index-score margins (~0.07) lie within bf16 rounding,
    so bf16 may select other keys; there only the rows before index_topk (every key kept) are asserted."""
    got, ref = runs(tp)["bf16"], refs["long"]
    rel = assert_bf16_matches_float32([g[:INDEX_TOPK] for g in got], [r[:INDEX_TOPK] for r in ref],
                                      f"V3.2 tp={tp}, rows before index_topk", min_decided=4)
    overall = max(((g.float() - r).norm() / r.norm()).item() for g, r in zip(got, ref))
    print(f"V3.2 bf16 tp={tp}: relative error {rel:.2e} before index_topk, {overall:.2e} over all rows")
    if not (tp == 4 and platform.backend() == "gloo"):
        assert_bf16_matches_float32(got, ref, f"V3.2 tp={tp}, all rows")


@pytest.mark.parametrize("tp", [2, 4])
def test_saved_bytes_shrink_by_t(runs, tp):
    """Bytes saved for backward per rank by a V3.2 layer (sparse attention, indexer without gradient)
    under SP <= 1.05 x (t = 1 bytes) / t, dense and MoE layer."""
    base, got = runs(1)["saved_bytes"], runs(tp)["saved_bytes"]
    for kind in ("dense", "sparse"):
        worst = max(got[kind]) / (base[kind][0] / tp)
        assert worst <= 1.05, f"{kind} layer, tp={tp}: saved bytes {worst:.3f} x (t=1 bytes)/t"


def test_indexer_flops_split_by_t(runs):
    base = runs(1)["flops"][False]
    got = runs(4)["flops"]
    print(f"indexer FLOPs of one layer: t=1 {base}, t=4 SP on {got[True]} per rank, SP off {got[False]}")
    assert base > 0 and got[True] * 4 == base
    assert got[False] == base  # SP off: replicated


def test_collective_counts(runs):
    """Per layer under SP: V3's latent gather and o_proj reduce-scatter, plus one all-gather of the
    indexer key (index_head_dim = 16 per token) and one of the int32 selection ([T, index_topk])."""
    counts = runs(2)["counts"]
    v3 = {"all_gather": 1, "reduce_scatter": 1}
    assert counts["v3", True, "long"] == (v3, ["(11,48)"])
    assert counts["v32", True, "long"] == ({"all_gather": 3, "reduce_scatter": 1}, ["(11,48)", "(11,16)", "(11,3)"])
    assert counts["v32", True, "short"] == counts["v3", True, "short"] == (v3, ["(3,48)"])  # scoring skipped
    for sp in (True, False):
        extra = {"all_gather": 2} if sp else {}
        v3_ops = counts["v3", sp, "backward"]
        assert counts["v32", sp, "backward"] == {op: n + extra.get(op, 0) for op, n in v3_ops.items()}, sp
    for arch in ("v32", "v3"):
        for name in ("long", "short"):
            assert counts[arch, False, name] == ({"all_reduce": 1}, []), (arch, name)  # SP off: indexer replicated


def test_config_fields():
    """V3.2 follows its saved mlp_layer_types (transformers' V3.2 does; V3 refuses a disagreeing list) and
    always ropes MLA interleaved; its indexer fields and defaults are transformers'."""
    from sp_core.models import ModelConfig, ModelError
    from sp_core.app.tiny import hf_config

    raw = hf_config("deepseek-v32").to_dict()
    raw["architectures"] = ["DeepseekV32ForCausalLM"]
    cfg = ModelConfig.from_dict(raw)
    assert cfg.indexer.index_topk == INDEX_TOPK and cfg.indexer.index_head_dim == 16 and cfg.mla.rope_interleave
    assert cfg.layer_types == ("dense", "sparse")
    assert ModelConfig.from_dict(dict(raw, mlp_layer_types=["sparse", "dense"])).layer_types == ("sparse", "dense")
    assert ModelConfig.from_dict(dict(raw, rope_interleave=False)).mla.rope_interleave
    defaults = {k: v for k, v in raw.items() if not k.startswith("index_")}
    assert vars(ModelConfig.from_dict(defaults).indexer) == dict(index_topk=2048, index_n_heads=64, index_head_dim=128)
    with pytest.raises(ModelError, match="mlp_layer_types must list"):
        ModelConfig.from_dict(dict(raw, mlp_layer_types=["dense"]))


def test_weights_proj_keeps_float32_through_casts():
    """``.half()`` / ``.to(dtype)`` cast the indexer but leave weights_proj float32 and its values; a device
    move still moves it ("meta" stands for another device on a CPU-only machine)."""
    from sp_core.layers.indexer import LightningIndexer

    with single_process():  # a layer is built on a context: one rank here
        indexer = LightningIndexer(64, 24, 8, 16, 8, INDEX_TOPK, 10000.0)
    before = indexer.weights_proj.weight.detach().clone()
    for cast, dtype in ((lambda m: m.half(), torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16)):
        cast(indexer)
        assert indexer.wq_b.weight.dtype == dtype and indexer.weights_proj.weight.dtype == torch.float32, dtype
        assert torch.equal(indexer.weights_proj.weight, before), dtype
    indexer.to("meta")
    assert indexer.weights_proj.weight.device.type == "meta" and indexer.weights_proj.weight.dtype == torch.float32


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from sp_core.app.cli import main

    prompts = tmp_path / "p.json"
    prompts.write_text("[[1, 2, 3]]")
    cases = [
        (lambda c: c.update(q_lora_rank=None), "q_lora_rank: null is not supported for DeepseekV32ForCausalLM"),
        (lambda c: c.update(index_head_dim=4), "index_head_dim (4) must be >= qk_rope_head_dim (8)"),
        (lambda c: c.update(index_topk=0), "index_topk must be a positive integer, got 0"),
    ]
    for edit, message in cases:
        model = with_edited_config(tmp_path, "deepseek-v32", edit)
        for command in (["logits", "--model", model, "--prompts", str(prompts), "--out", str(tmp_path / "o.st")],
                        ["memory", "--model", model, "--tp", "2", "--tokens", "8"]):
            capsys.readouterr()
            code = main(command)
            lines = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and message in lines[0], (command[0], code, lines)


def test_cli_logits_and_memory(dirs, refs, tmp_path, capsys):
    from safetensors.torch import load_file

    from sp_core.app.cli import main

    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(LONG))
    out = str(tmp_path / "out.safetensors")
    assert main(["logits", "--model", dirs["v32"], "--prompts", str(prompts), "--out", out, "--tp", "2",
                 "--dtype", "float32"]) == 0  # the GPU default is bf16
    got = load_file(out)
    assert max_diff([got[f"logprobs.{i}"] for i in range(len(LONG))], refs["long"]) <= 1e-4
    capsys.readouterr()
    assert main(["memory", "--model", dirs["v32"], "--tp", "2", "--tokens", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "DeepseekV32ForCausalLM"
    assert report["index_selection_bytes_per_rank"] == 4 * 64 * INDEX_TOPK  # int32 [T, k] on every rank
