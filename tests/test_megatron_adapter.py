"""The core inside real megatron-core (gloo, CPU): training equals TP=1, export loads in transformers,
and `sp-core logits --engine megatron` equals transformers. CPU support: sp_core_megatron.cli_engine.cpu_training."""
import json

import pytest
import torch

from sp_core.app.cli import main
from sp_core.app.tiny import PROMPTS, make_checkpoint, reference_logprobs
from support.compare import max_diff, rel
from support.multirank import run_ranks

STEPS = 5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    return {name: make_checkpoint(name, str(root / name)) for name in ("qwen2-train", "qwen3-train", "qwen2")}


_BASELINES = {}  # (checkpoint, tp, SP) -> a run without export: the same tp 1 baseline serves several tests


def _train(model_dir, tp, sp, out_dir=None, prompts=None):
    from sp_core_megatron.cli_engine import engine

    if out_dir is not None or prompts is not None:
        return engine.train_steps(model_dir, tp, sp, STEPS, out_dir=out_dir, prompts=prompts, capture_grads=True)
    if (model_dir, tp, sp) not in _BASELINES:
        _BASELINES[(model_dir, tp, sp)] = engine.train_steps(model_dir, tp, sp, STEPS, capture_grads=True)
    return _BASELINES[(model_dir, tp, sp)]


@pytest.mark.parametrize("name", ["qwen2-train", "qwen3-train"])
def test_training_at_tp2_equals_tp1(ckpts, name, tmp_path):
    base = _train(ckpts[name], 1, False)
    assert base["losses"][-1] < base["losses"][0], "the loss should fall on the built-in stream"
    for sp in (True, False):
        out_dir = str(tmp_path / f"export-sp{sp}")
        got = _train(ckpts[name], 2, sp, out_dir=out_dir, prompts=PROMPTS)
        for step, (a, b) in enumerate(zip(got["losses"], base["losses"])):
            assert abs(a - b) <= 1e-5, f"{name} SP={sp} step {step}: loss {a} vs {b}"
        assert got["grads0"].keys() == base["grads0"].keys()
        for key, grad in base["grads0"].items():
            assert rel(got["grads0"][key], grad) <= 1e-5, f"{name} SP={sp}: step-0 gradient of {key}"
        # the export loads in transformers and gives the adapter's own log-probabilities
        diff = max_diff(got["logprobs"], reference_logprobs(out_dir, PROMPTS))
        assert diff <= 1e-4, f"{name} SP={sp}: exported model vs adapter {diff}"


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_logits_engine_megatron_equals_transformers(ckpts, tp, sp, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(PROMPTS))
    out = str(tmp_path / "o.safetensors")
    flag = "--sequence-parallel" if sp else "--no-sequence-parallel"
    assert main(["logits", "--engine", "megatron", "--model", ckpts["qwen2"], "--prompts", str(prompts),
                 "--out", out, "--tp", str(tp), flag, "--dtype", "float32"]) == 0
    from safetensors.torch import load_file

    got = load_file(out)
    for i, ref in enumerate(reference_logprobs(ckpts["qwen2"], PROMPTS)):
        assert (got[f"logprobs.{i}"] - ref).abs().max() <= 1e-4


def _tags_and_untagged_grads(model_dir):
    """Every replicated parameter's tag, and step-0 gradients with the norms' tags removed."""
    from sp_core_megatron.cli_engine import cpu_training, engine, training

    cpu_training.enable()
    model = engine.build_model(model_dir, 2, True)
    tags = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "sequence_parallel", False))
            for n, p in model.language_model.named_parameters()}
    for name, param in model.language_model.named_parameters():
        if getattr(param, "sequence_parallel", False):
            param.sequence_parallel = False
    _, _, grads = training.train(model, 1, clip_grad=0.0, capture_step0_grads=True)
    return tags, grads


def test_replicated_parameters_keep_their_sequence_parallel_tag(ckpts):
    d = ckpts["qwen3-train"]
    tags, untagged = run_ranks(2, _tags_and_untagged_grads, d)[0]
    for name, (tp, sp) in tags.items():
        if not tp and "q_norm" not in name and "k_norm" not in name:  # q/k norm: summed by f in autograd
            assert sp, f"{name} is replicated but not tagged sequence_parallel"
    # what the tag buys: without it finalize_model_grads leaves the norm gradients as partial sums
    base = _train(d, 1, False)["grads0"]
    wrong = {k for k in base if rel(untagged[k], base[k]) > 1e-3}
    assert wrong and all("layernorm" in k or k == "model.norm.weight" for k in wrong), wrong


def _extension_points(model_dir):
    import argparse

    from megatron.core import parallel_state

    from sp_core_megatron import SPCoreGPTModel, build_model, extra_args_provider, transformer_config_from_hf
    from sp_core_megatron.config import check_supported
    from sp_core.models import ModelError

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    config = transformer_config_from_hf(model_dir, tp=2, sequence_parallel=True)
    model = build_model(config)
    assert isinstance(model, SPCoreGPTModel) and model.config.sequence_parallel
    args = extra_args_provider(argparse.ArgumentParser()).parse_args(["--sp-core", "--sp-core-hf-model", model_dir])
    assert args.sp_core and args.sp_core_hf_model == model_dir
    errors = []
    for field, value in (("pipeline_model_parallel_size", 2), ("expert_model_parallel_size", 2)):
        bad = transformer_config_from_hf(model_dir, tp=2)
        object.__setattr__(bad, field, value)
        try:
            check_supported(bad)
        except ModelError as err:
            errors.append(str(err))
    try:  # context parallelism is supported, on the CP group Megatron made: not on one it did not
        build_model(transformer_config_from_hf(model_dir, tp=2, context_parallel_size=2))
    except ModelError as err:
        errors.append(str(err))
    return errors


def test_spec_flag_and_unsupported_settings(ckpts):
    errors = run_ranks(2, _extension_points, ckpts["qwen3-train"])[0]
    assert len(errors) == 3 and all("\n" not in e for e in errors) and "use 1" in errors[0], errors
    assert "pipeline" in errors[0]
    assert "expert_model_parallel_size=2 with expert_tensor_parallel_size=2" in errors[1]  # only EP = tp, ETP = 1
    assert errors[2].startswith("config.context_parallel_size=2 but Megatron's context-parallel group has 1 ranks")


def _gpt_model_with_core_layers(sp):
    """megatron.core's own GPTModel built with the core's layer spec; two training steps."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from sp_core.mpu import platform
    from sp_core_megatron import get_sp_core_block_spec
    from sp_core_megatron.cli_engine import cpu_training, engine, training

    cpu_training.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8, ffn_hidden_size=64,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=2, sequence_parallel=sp,
        use_cpu_initialization=True, gradient_accumulation_fusion=False, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False)
    model = GPTModel(config, get_sp_core_block_spec(2), vocab_size=64, max_sequence_length=16,
                     position_embedding_type="none").to(platform.current_device())
    ddp, optimizer = training.wrap_for_training(model, clip_grad=0.0)
    data = training.token_stream(64, 16, 2, platform.current_device())
    losses, grads = [], {}
    for step in range(2):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(forward_step_func=training.forward_step, data_iterator=data, model=[ddp],
                                          num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=False)
        if step == 0:
            grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        losses.append(float(out[0]["lm loss"]))
    return losses, grads, _one_layer_op_counts(config)


def _one_layer_op_counts(config):
    """What one decoder layer's forward + backward dispatches (benchmarks/host_overhead.py measures the
    time): the core's layer from the spec, and Megatron-native's local-spec layer of the same config (both
    outside DDP, whose gradient hooks would add their own ops)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from sp_core import mpu
    from sp_core_megatron import get_sp_core_block_spec
    from support.megatron_cpu import SequenceParallelNorm, local_gpt_layer_spec
    from support.op_counts import count_ops

    core_model = GPTModel(config, get_sp_core_block_spec(2), vocab_size=64, max_sequence_length=16,
                          position_embedding_type="none")
    layer = local_gpt_layer_spec(qk_layernorm=True, normalization="RMSNorm")
    native = GPTModel(config, TransformerBlockSubmodules(layer_specs=[layer] * 2, layer_norm=SequenceParallelNorm),
                      vocab_size=64, max_sequence_length=16, position_embedding_type="rope")
    s, b = 16, 2
    x = torch.randn(s // mpu.default_context().size if config.sequence_parallel else s, b, config.hidden_size, requires_grad=True)
    with mpu.counting_collectives() as issued:
        core = count_ops(lambda: core_model.decoder.layers[0](x)[0], torch.ones_like(x))
    rope = native.rotary_pos_emb(s)
    reference = count_ops(lambda: native.decoder.layers[0](x, attention_mask=None, rotary_pos_emb=rope)[0],
                          torch.ones_like(x))
    return core, reference, dict(issued)


def test_megatron_gpt_model_with_core_layer_spec_sp_on_equals_off():
    on = run_ranks(2, _gpt_model_with_core_layers, True)
    off = run_ranks(2, _gpt_model_with_core_layers, False)
    assert any("layer.self_attn.qkv_proj" in n for n in on[0][1])
    for rank in range(2):
        for a, b in zip(on[rank][0], off[rank][0]):
            assert abs(a - b) <= 1e-5, (on[rank][0], off[rank][0])
        for name, grad in off[rank][1].items():
            assert rel(on[rank][1][name], grad) <= 1e-5, f"rank {rank}: {name}"
    # host work per layer (issue 19): the core's layer dispatches no more ATen ops than Megatron's own, forward
    # and backward; it issues Megatron's collectives plus, in backward, the sums of the q/k-norm weights'
    # partial gradients (2 all-reduces, which Megatron leaves to finalize_model_grads)
    for sp, (core, native, issued) in ((True, on[0][2]), (False, off[0][2])):
        for phase in ("fwd", "bwd"):
            assert core[f"aten_{phase}"] <= native[f"aten_{phase}"], (sp, phase, core[f"ops_{phase}"],
                                                                      native[f"ops_{phase}"])
        assert (core["collectives_fwd"], core["collectives_bwd"]) == (native["collectives_fwd"],
                                                                      native["collectives_bwd"] + 2)
        assert issued == ({"all_gather": 6, "reduce_scatter": 4, "all_reduce": 2} if sp else {"all_reduce": 6}), issued


def test_train_command_reports_progress_and_exports(ckpts, tmp_path, capfd):
    out = str(tmp_path / "trained")
    assert main(["train", "--model", ckpts["qwen3-train"], "--tp", "2", "--sequence-parallel", "--steps", "3",
                 "--out", out, "--seq-length", "16"]) == 0
    err = capfd.readouterr().err
    assert "tp 2 | sequence parallel on" in err
    for step in (1, 2, 3):
        assert f"step {step}/3 | loss " in err and "tokens/s" in err
    ref = reference_logprobs(out, PROMPTS)  # transformers loads the export
    assert len(ref) == len(PROMPTS) and all(torch.isfinite(r).all() for r in ref)
