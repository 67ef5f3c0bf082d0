"""FP8 checkpoints in the published format (DeepSeek-V3 / V3.2, Qwen3-FP8): float8_e4m3fn weights with a
float32 ``weight_scale_inv`` per [bn, bk] block (``quantization_config.weight_block_size``), dequantised at
load by the core's loader, Megatron's HF loader (``load_hf_into_gpt_model``) and the sglang adapter.

The checkpoints are the tiny presets with shapes that are not multiples of the block (edge blocks partial,
every rank's shard starting inside a block), quantised here block by block with a small block (16 x 16 for
DeepSeek, 16 x 24 for Qwen3: a transposed scale grid shows) and blocks of different magnitudes (a wrong
block's scale shows). The reference is transformers on the dequantised weights, written by this file's own
block loop (not the code under test) as an unquantised float32 checkpoint. Also a Qwen3 checkpoint with one
``weight_scale`` per tensor and static ``input_scale`` s (sglang's / AutoFP8's per-tensor form).

Negative controls: the same comparison fails with the scales ignored (FP8 loaded as if unquantised), with the
block grid stretched over the tensor (edge blocks ignored) and with each rank's shard dequantised as if it
started at the tensor's origin. Refusals: a missing scale, a scale of the wrong shape, another quant_method
-- one line, exit 2, before any rank starts.
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sp_core.app.cli import main
from sp_core.app.tiny import make_checkpoint, reference_logprobs
from support.contexts import remake
from support.compare import max_diff
from support.multirank import launches_per_tp, run_ranks

PROMPTS = [[1, 5, 9, 3, 4, 20, 30, 11], [7], [2, 8, 60, 11, 13]]
TOL = 1e-4
FP8_MAX = 448.0
# name -> (tiny preset, overrides: no quantised dimension a multiple of the block, block, per-tensor scales)
MODELS = {
    "deepseek-v3": ("deepseek-v3", dict(hidden_size=72, intermediate_size=88, moe_intermediate_size=20,
                                        kv_lora_rank=20), [16, 16], False),
    "deepseek-v32": ("deepseek-v32", dict(hidden_size=72, intermediate_size=88, moe_intermediate_size=20,
                                          kv_lora_rank=20), [16, 16], False),
    "qwen3": ("qwen3", dict(hidden_size=52, intermediate_size=72), [16, 24], False),
    "qwen3-per-tensor": ("qwen3", dict(hidden_size=52, intermediate_size=72), None, True),
}
# + DeepSeek-V3 with its routed experts fused on disk (transformers' [E, 2I, H] gate_up_proj / [E, H, I] down_proj,
# each with a [E, rows, cols] block grid): with I = 20 a block straddles the gate / up boundary
CORE_MODELS = ("deepseek-v3", "deepseek-v32", "qwen3", "qwen3-per-tensor", "deepseek-v3-fused")


def _quantised(name: str, tensor: torch.Tensor) -> bool:
    """The linear weights the published checkpoints store in FP8: not embeddings, LM head, norms, the router
    gate (``mlp.gate``) or V3.2's indexer head weights."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2
            and "norm" not in name and not name.endswith("mlp.gate.weight") and "weights_proj" not in name)


def _quantise_blocks(w: torch.Tensor, block, gen):
    """(fp8, scale_inv, dequantised float64) of ``w``, block by block; each block first scaled by its own
    factor in [1/4, 4], so that neighbouring blocks' scales differ."""
    n, k = w.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols, dtype=torch.float32)
    deq = torch.empty(n, k, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            part = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].double() * 2.0 ** (4 * torch.rand((), generator=gen) - 2)
            s = torch.tensor(part.abs().max().item() / FP8_MAX, dtype=torch.float32)
            qb = (part / s.double()).to(torch.float8_e4m3fn)
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qb
            scale[i, j] = s
            deq[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = qb.double() * s.double()
    return q, scale, deq


def _quantise_tensor(w: torch.Tensor, gen):
    """(fp8, weight_scale [1], dequantised float64): one scale per tensor."""
    s = torch.tensor([w.abs().max().item() / FP8_MAX], dtype=torch.float32)
    q = (w.double() / s.double()).to(torch.float8_e4m3fn)
    return q, s, q.double() * s.double()


def write_fp8(src: str, fp8_dir: str, ref_dir: str, block, per_tensor: bool, seed: int = 0) -> None:
    """``fp8_dir``: ``src`` quantised in the published format; ``ref_dir``: its dequantised weights (float32)
    with the unquantised config, for transformers."""
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(os.path.join(src, "model.safetensors"))
    fp8, ref = {}, {}
    for name, w in weights.items():
        if not _quantised(name, w):
            fp8[name] = ref[name] = w
            continue
        if per_tensor:
            q, s, deq = _quantise_tensor(w, gen)
            fp8[name], fp8[name + "_scale"] = q, s
            fp8[name[: -len("weight")] + "input_scale"] = torch.tensor([0.02])  # static activation scale
        else:
            q, s, deq = _quantise_blocks(w, block, gen)
            fp8[name], fp8[name + "_scale_inv"] = q, s
        ref[name] = deq.float()
    cfg = json.load(open(os.path.join(src, "config.json")))
    for d, tensors in ((fp8_dir, fp8), (ref_dir, ref)):
        os.makedirs(d)
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    json.dump(cfg, open(os.path.join(ref_dir, "config.json"), "w"), indent=2)
    cfg["quantization_config"] = (
        dict(quant_method="fp8", activation_scheme="static") if per_tensor else
        dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=list(block)))
    json.dump(cfg, open(os.path.join(fp8_dir, "config.json"), "w"), indent=2)


def write_fused_fp8(src: str, fp8_dir: str, ref_dir: str, block, seed: int = 0) -> None:
    """``src`` with every MoE layer's routed experts fused and quantised as fused tensors (``fp8_dir``), and the
    dequantised experts per expert (``ref_dir``, for transformers)."""
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(os.path.join(src, "model.safetensors"))
    fp8, ref = {}, {}
    experts = sorted({n[: n.index(".experts.") + len(".experts.")] for n in weights if ".experts." in n})
    for name, w in weights.items():
        if ".experts." in name:
            continue
        if _quantised(name, w):
            q, s, deq = _quantise_blocks(w, block, gen)
            fp8[name], fp8[name + "_scale_inv"], ref[name] = q, s, deq.float()
        else:
            fp8[name] = ref[name] = w
    for prefix in experts:
        count = len({n for n in weights if n.startswith(prefix) and n.endswith("down_proj.weight")})
        fused = {"gate_up_proj": [torch.cat([weights[f"{prefix}{e}.gate_proj.weight"],
                                             weights[f"{prefix}{e}.up_proj.weight"]]) for e in range(count)],
                 "down_proj": [weights[f"{prefix}{e}.down_proj.weight"] for e in range(count)]}
        for key, per_expert in fused.items():
            parts = [_quantise_blocks(w, block, gen) for w in per_expert]
            fp8[prefix + key] = torch.stack([p[0] for p in parts])
            fp8[prefix + key + "_scale_inv"] = torch.stack([p[1] for p in parts])
            for e, (_, _, deq) in enumerate(parts):
                if key == "down_proj":
                    ref[f"{prefix}{e}.down_proj.weight"] = deq.float()
                else:
                    gate, up = deq.float().chunk(2)
                    ref[f"{prefix}{e}.gate_proj.weight"], ref[f"{prefix}{e}.up_proj.weight"] = gate, up
    cfg = json.load(open(os.path.join(src, "config.json")))
    for d, tensors in ((fp8_dir, fp8), (ref_dir, ref)):
        os.makedirs(d)
        save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
    json.dump(cfg, open(os.path.join(ref_dir, "config.json"), "w"), indent=2)
    cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                      weight_block_size=list(block))
    json.dump(cfg, open(os.path.join(fp8_dir, "config.json"), "w"), indent=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    out = {"root": str(root)}
    for name, (preset, overrides, block, per_tensor) in MODELS.items():
        src = make_checkpoint(preset, str(root / f"{name}-src"), **overrides)
        write_fp8(src, str(root / f"{name}-fp8"), str(root / f"{name}-ref"), block, per_tensor)
        out[name] = str(root / f"{name}-fp8")
        out[name + "-ref"] = str(root / f"{name}-ref")
    write_fused_fp8(str(root / "deepseek-v3-src"), str(root / "deepseek-v3-fused-fp8"),
                    str(root / "deepseek-v3-fused-ref"), MODELS["deepseek-v3"][2])
    out["deepseek-v3-fused"] = str(root / "deepseek-v3-fused-fp8")
    out["deepseek-v3-fused-ref"] = str(root / "deepseek-v3-fused-ref")
    return out


@pytest.fixture(scope="module")
def refs(dirs):
    return {name: reference_logprobs(dirs[name + "-ref"], PROMPTS) for name in (*MODELS, "deepseek-v3-fused")}


# -- the core ---------------------------------------------------------------------------------------------

def _stretched_grid(original):
    """Negative control: the scale grid spread evenly over the tensor (right only where the block divides it)."""
    def dequantize(self):
        values = self.data.to(torch.float64)
        n, k = values.shape[-2:]
        rows = torch.arange(n) * self.scale.shape[-2] // n
        cols = torch.arange(k) * self.scale.shape[-1] // k
        return (values * self.scale.index_select(-2, rows).index_select(-1, cols)).to(self.dtype)
    return dequantize


def _at_origin(original):
    """Negative control: every rank dequantises its shard as if it started at the tensor's first block."""
    return lambda self: original(type(self)(self.name, self.data, self.scale, self.fmt, self.dtype))


def _ignore_scales(original):
    """Negative control: the FP8 values loaded as if unquantised."""
    return lambda self: self.data.to(self.dtype)


def _core_rank(dirs, tp):
    from sp_core import mpu
    from sp_core.models import fp8
    from sp_core.models.checkpoint import save_hf_checkpoint
    from sp_core.app.runtime import load_model, prompt_logprobs

    out = {}
    for name in CORE_MODELS:
        modes = ("tp", "ep") if name.startswith("deepseek") and tp > 1 else ("tp",)
        for sp in ((False, True) if tp > 1 else (False,)):
            remake(sequence_parallel=sp)
            for mode in modes:
                out[name, sp, mode] = prompt_logprobs(load_model(dirs[name], moe_parallel=mode), PROMPTS)
    remake(sequence_parallel=tp > 1)
    controls = {1: {"scales ignored": _ignore_scales, "grid stretched": _stretched_grid},
                2: {"shards at the origin": _at_origin}}.get(tp, {})
    original = fp8.FP8Tensor.dequantize
    for control, bad in controls.items():
        fp8.FP8Tensor.dequantize = bad(original)
        try:
            out[control] = {name: prompt_logprobs(load_model(dirs[name]), PROMPTS) for name in ("deepseek-v3", "qwen3")}
        finally:
            fp8.FP8Tensor.dequantize = original
    if tp == 2:  # an export of the loaded FP8 model: unquantised, without quantization_config
        save_hf_checkpoint(load_model(dirs["deepseek-v3"]), os.path.join(dirs["root"], "export-v3"))
    return out


@pytest.fixture(scope="module")
def core(dirs):
    return launches_per_tp(_core_rank, dirs)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_core_equals_transformers_on_the_dequantised_weights(core, refs, tp):
    """tp 1, 2 and 4 (every rank's shard starting inside a block), SP off and on, both MoE modes: within 1e-4 of transformers on the dequantised weights."""
    got = core(tp)
    runs = [k for k in got if isinstance(k, tuple)]
    assert {k[0] for k in runs} == set(CORE_MODELS)
    for name, sp, mode in runs:
        diff = max_diff(got[name, sp, mode], refs[name])
        assert diff <= TOL, f"{name} tp {tp} SP {sp} moe {mode}: {diff:.2e}"


@pytest.mark.parametrize("tp,control", [(1, "scales ignored"), (1, "grid stretched"), (2, "shards at the origin")])
def test_negative_controls_fail_the_comparison(core, refs, tp, control):
    """The comparison above would catch a loader that ignores the scales, the partial edge blocks or the
    position of a rank's shard in the block grid."""
    got = core(tp)[control]
    for name, logprobs in got.items():
        diff = max_diff(logprobs, refs[name])
        assert diff > 10 * TOL, f"{control}: {name} still within {diff:.2e} of the reference"


def test_verify_reference_dequantises_fp8_checkpoints_itself(dirs, refs):
    """``reference_logprobs`` of an FP8 checkpoint (``sp-core verify``'s reference: transformers on the weights its
    own few lines dequantise) equals transformers on this file's block loop's dequantised weights: block-wise,
    per-tensor (with static input scales) and fused experts."""
    for name in ("deepseek-v3", "qwen3", "qwen3-per-tensor", "deepseek-v3-fused"):
        # the same weights; the fused checkpoint reaches transformers' experts by another conversion: 2.9e-6
        assert max_diff(reference_logprobs(dirs[name], PROMPTS), refs[name]) <= 1e-5, name


def test_embedded_fp8_preset_is_in_the_published_format(tmp_path):
    """``deepseek-v3-fp8`` (in verify's default matrix): float8_e4m3fn linear weights of the decoder layers with
    float32 block scales over 16 x 16 blocks, partial at the edges; embeddings, LM head, norms and the router
    unquantised; quantization_config as DeepSeek-V3 publishes it (block size aside)."""
    from safetensors import safe_open

    out = make_checkpoint("deepseek-v3-fp8", str(tmp_path / "v3-fp8"))
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"] == dict(
        quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[16, 16])
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        kinds = {name: (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) for name in f.keys()}
    quantised = [n for n, (dtype, _) in kinds.items() if dtype == "F8_E4M3"]
    assert {n.split(".")[-2] for n in quantised} == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                      "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name in quantised:
        shape = kinds[name][1]
        assert kinds[name + "_scale_inv"] == ("F32", [-(-shape[0] // 16), -(-shape[1] // 16)]), name
    assert any(dim % 16 for n in quantised for dim in kinds[n][1])  # partial edge blocks
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert kinds[name][0] == "F32", name


def test_export_of_an_fp8_checkpoint_is_unquantised(core, dirs, refs):
    """``save_hf_checkpoint`` of a model loaded from FP8 (what ``sp-core train`` exports): the model's dtype,
    no scales, no quantization_config; transformers loads it and gives the reference logits."""
    core(2)
    export = os.path.join(dirs["root"], "export-v3")
    cfg = json.load(open(os.path.join(export, "config.json")))
    assert "quantization_config" not in cfg
    tensors = load_file(os.path.join(export, "model.safetensors"))
    assert not any("scale" in n for n in tensors) and {t.dtype for t in tensors.values()} == {torch.float32}
    assert max_diff(reference_logprobs(export, PROMPTS), refs["deepseek-v3"]) <= TOL


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_train_from_an_fp8_checkpoint_exports_unquantised(dirs, tmp_path):
    """``sp-core train``'s path (the Megatron adapter's ``train_steps``, tp 2, SP) from the FP8 Qwen3: trains the
    dequantised weights and exports them unquantised, which transformers loads."""
    from sp_core_megatron.cli_engine import engine

    out = tmp_path / "trained"
    losses = engine.train_steps(dirs["qwen3"], 2, True, 2, out_dir=str(out), seq_length=16)["losses"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert "quantization_config" not in json.load(open(out / "config.json"))
    tensors = load_file(str(out / "model.safetensors"))
    assert not any("scale" in n for n in tensors) and {t.dtype for t in tensors.values()} == {torch.float32}
    assert all(torch.isfinite(x).all() for x in reference_logprobs(str(out), PROMPTS))


# -- Megatron's HF loader ---------------------------------------------------------------------------------

def _gpt_model_rank(dirs, names, tp):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from sp_core.layers import gather_vocab
    from sp_core_megatron.cli_engine import cpu_training
    from sp_core_megatron import (get_sp_core_block_spec, gpt_model_args, load_hf_into_gpt_model,
                                  transformer_config_from_hf)

    cpu_training.enable()
    out = {}
    for name in names:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        config = transformer_config_from_hf(dirs[name], tp=tp, sequence_parallel=True)
        model = GPTModel(config, get_sp_core_block_spec(config.num_layers), **gpt_model_args(config))
        load_hf_into_gpt_model(model, dirs[name])
        out[name] = []
        with torch.no_grad():
            for prompt in PROMPTS:
                padded = prompt + [0] * (-len(prompt) % tp)  # Megatron's SP needs s divisible by tp (causal)
                logits = model(torch.tensor([padded]), torch.arange(len(padded)).unsqueeze(0), None)[0]
                out[name].append(torch.log_softmax(gather_vocab(logits, config.vocab_size), -1)[: len(prompt)])
    return out


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_megatron_gpt_model_loader_equals_transformers(dirs, refs):
    """``load_hf_into_gpt_model`` (megatron.core's GPTModel with the core's layers) at tp 2 with SP."""
    names = ("deepseek-v3", "qwen3")
    got = run_ranks(2, _gpt_model_rank, dirs, names, 2)[0]
    for name in names:
        diff = max_diff(got[name], refs[name])
        assert diff <= TOL, f"GPTModel {name}: {diff:.2e}"


# -- sglang ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(900)
@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed")
def test_sglang_serves_the_dequantised_weights(dirs, refs):
    """One engine (DeepSeek-V3.2 FP8, tp 2: V3's layers plus the indexer, whose index_topk the adapter hides
    from sglang too) serves SP off and on. sglang never sees the FP8 quantization_config (no Fp8Config, which
    would refuse float32); the adapter dequantises at load."""
    from sp_core_sglang.cli_engine import engine

    with engine.reusing():
        for sp in (False, True):
            got = engine.logprobs(dirs["deepseek-v32"], PROMPTS, 2, sp, torch.float32)
            diff = max_diff(got, refs["deepseek-v32"])
            assert diff <= TOL, f"sglang tp 2 SP {sp}: {diff:.2e}"


def _resolve(launches):
    """In the engine host: sglang's own server-argument resolution with the adapter enabled, for each
    (model_dir, extra server arguments); per launch (error or None, the model config overrides it resolved)."""
    from sglang.srt.arg_groups.model_override_base import resolved_view
    from sglang.srt.server_args import ServerArgs

    from sp_core_sglang import plugin
    from sp_core_sglang.cli_engine import cpu_env

    cpu_env.apply_cpu_engine_env(1)
    plugin.enable()
    out = []
    for model_dir, extra in launches:
        args = ServerArgs(model_path=model_dir, device="cpu", attention_backend="torch_native", dtype="float32",
                          disable_cuda_graph=True, skip_tokenizer_init=True, grammar_backend="none", **extra)
        try:
            args.resolve_once()
        except ValueError as err:
            out.append((str(err), None))
            continue
        out.append((None, resolved_view(args).json_model_override_args))
    return out


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed")
def test_sglang_never_sees_the_fp8_quantization_config(dirs):
    """The adapter moves an FP8 quantization_config under its own key (keeping the user's overrides), so that
    sglang builds no Fp8Config; sglang's --quantization and another quant_method are still refused."""
    from sp_core_sglang.cli_engine import engine_process
    from sp_core_sglang.options import HIDDEN_QUANTIZATION

    quant = json.load(open(os.path.join(dirs["deepseek-v3"], "config.json")))["quantization_config"]
    (error, overrides), (quantization, _), (awq, _) = engine_process.call(_resolve, [
        (dirs["deepseek-v3"], {"json_model_override_args": '{"rms_norm_eps": 1e-6}'}),
        (dirs["deepseek-v3"], {"quantization": "fp8"}),
        (_variant(dirs, "awq", **REFUSED["awq"][0]), {})])
    assert error is None, error
    assert json.loads(overrides) == {"rms_norm_eps": 1e-6, "quantization_config": None, HIDDEN_QUANTIZATION: quant}
    assert quantization is not None and "--quantization=fp8" in quantization, quantization
    assert awq is not None and "config.json quantization_config=awq" in awq, awq


# -- refusals ---------------------------------------------------------------------------------------------

def _variant(dirs, name, edit_weights=None, edit_config=None) -> str:
    src = dirs["deepseek-v3"]
    d = os.path.join(dirs["root"], name)
    if not os.path.exists(d):
        shutil.copytree(src, d)
        if edit_weights:
            weights = load_file(os.path.join(d, "model.safetensors"))
            edit_weights(weights)
            save_file(weights, os.path.join(d, "model.safetensors"))
        if edit_config:
            cfg = json.load(open(os.path.join(d, "config.json")))
            edit_config(cfg["quantization_config"])
            json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d


SCALE = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
REFUSED = {
    "missing scale": (dict(edit_weights=lambda w: w.pop(SCALE)),
                      f"checkpoint tensor model.layers.1.self_attn.kv_b_proj.weight is stored in FP8 but its scale "
                      f"{SCALE} is missing"),
    "transposed scale": (dict(edit_weights=lambda w: w.update({SCALE: w[SCALE].t().contiguous()})),
                         f"checkpoint tensor {SCALE} has shape [2, 7]; expected [7, 2]"),
    "scale for 128 x 128 blocks": (dict(edit_weights=lambda w: w.update({SCALE: w[SCALE][:1, :1].contiguous()})),
                                   f"checkpoint tensor {SCALE} has shape [1, 1]; expected [7, 2]"),
    "block size of the config": (dict(edit_config=lambda q: q.update(weight_block_size=[16, 32])),
                                 "down_proj.weight_scale_inv has shape [5, 6]; expected [5, 3] (the blocks of [16, 32]"),
    "scale of an unquantised weight": (
        dict(edit_weights=lambda w: w.update({"model.layers.1.mlp.gate.weight_scale_inv": torch.ones(1, 5)})),
        "checkpoint tensor model.layers.1.mlp.gate.weight_scale_inv is the scale of model.layers.1.mlp.gate.weight, "
        "which is stored in F32"),
    "awq": (dict(edit_config=lambda q: q.update(quant_method="awq")),
            "quantised checkpoints of quant_method 'awq' are not supported; supported: unquantised"),
    "gptq": (dict(edit_config=lambda q: q.update(quant_method="gptq")), "quant_method 'gptq' are not supported"),
    "compressed-tensors": (dict(edit_config=lambda q: q.update(quant_method="compressed-tensors")),
                           "quant_method 'compressed-tensors' are not supported"),
    "w8a8": (dict(edit_config=lambda q: q.update(quant_method="w8a8_int8")), "quant_method 'w8a8_int8' are not"),
    "e5m2": (dict(edit_config=lambda q: q.update(fmt="e5m2")), "quantization_config fmt 'e5m2' is not supported"),
    "bad block": (dict(edit_config=lambda q: q.update(weight_block_size=[16])),
                  "weight_block_size must be two positive integers"),
}
REFUSAL_CASES = [(case, "core") for case in REFUSED] + [("missing scale", "megatron"), ("missing scale", "sglang"),
                                                        ("transposed scale", "sglang")]


@pytest.mark.parametrize("case,engine", REFUSAL_CASES, ids=[f"{c}-{e}" for c, e in REFUSAL_CASES])
def test_bad_fp8_checkpoint_is_one_line_and_exit_2(dirs, capsys, tmp_path, case, engine):
    edits, expected = REFUSED[case]
    model = _variant(dirs, case.replace(" ", "-"), **edits)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(PROMPTS))
    capsys.readouterr()
    code = main(["logits", "--model", model, "--prompts", str(prompts), "--out", str(tmp_path / "o.st"),
                 "--engine", engine, "--tp", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], (code, err)
    assert not (tmp_path / "o.st").exists()


# -- the dequantisation itself (no ranks) ---------------------------------------------------------------

def test_fp8_tensor_slices_equal_the_whole():
    """Every slice a loader takes -- rows or columns at any offset, an expert of a fused [E, N, K] tensor and
    its gate / up halves -- equals the same slice of the whole tensor dequantised by the block loop above."""
    from sp_core.models.fp8 import FP8Format, FP8Tensor

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 37, 29, generator=gen)
    block = [8, 12]
    parts = [_quantise_blocks(w[e], block, gen) for e in range(3)]
    q = torch.stack([p[0] for p in parts])
    scale = torch.stack([p[1] for p in parts])
    deq = torch.stack([p[2] for p in parts])
    t = FP8Tensor.of("x", q, "x_scale_inv", scale, FP8Format(tuple(block)))
    assert torch.equal(t.dequantize(), deq)
    for e in range(3):
        assert torch.equal(t[e].narrow(0, 5, 19), deq[e, 5:24])
        assert torch.equal(t[e].narrow(1, 13, 16), deq[e, :, 13:29])
        assert torch.equal(t[e, 18:].narrow(0, 3, 10), deq[e, 21:31])  # the "up" half of a fused gate_up
    assert torch.equal(t[1].to(torch.bfloat16).narrow(0, 0, 37), deq[1].to(torch.bfloat16))  # one rounding


def test_scales_pair_with_their_weights_in_any_order():
    from sp_core.models.fp8 import FP8Format, FP8Tensor, dequantizing
    from sp_core.models.config import ModelError

    q = torch.randn(20, 10).to(torch.float8_e4m3fn)
    fmt = FP8Format((16, 16))
    s = torch.ones(2, 1)
    for order in ([("a.weight", q), ("a.weight_scale_inv", s)], [("a.weight_scale_inv", s), ("a.weight", q)]):
        (name, got), = list(dequantizing(order, fmt))
        assert name == "a.weight" and isinstance(got, FP8Tensor)
    with pytest.raises(ModelError, match="a.weight_scale_inv has shape \\[1, 2\\]; expected \\[2, 1\\]"):
        list(dequantizing([("a.weight", q), ("a.weight_scale_inv", s.t())], fmt))
    with pytest.raises(ModelError, match="a.weight is stored in FP8 but its scale a.weight_scale_inv is missing"):
        list(dequantizing([("a.weight", q)], fmt))
    with pytest.raises(ModelError, match="has no quantization_config"):
        list(dequantizing([("a.weight", q)], None))
