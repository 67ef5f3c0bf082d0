"""Megatron's context parallelism with the core's layers (gloo, CPU, real megatron-core): Adam training at
cp 2 x tp 2 (Megatron's own zig-zag batch split, its CP-aware loss scaling and gradient averaging) equals
cp 1 x tp 2 step for step (losses, every parameter's gradient, the weights after 3 steps); a distributed
checkpoint saved at cp 2 resumes at cp 1; megatron.core's GPTModel with the core's layer spec at cp 2 x tp 2 equals
transformers. Two launches: 4 ranks (cp 2 x tp 2), 2 ranks (cp 1 x tp 2)."""
import os

import pytest

from sp_core.app.tiny import make_checkpoint
from support.compare import max_diff, rel
from support.multirank import run_ranks

STEPS, SAVE_AT, SEQ, BATCH = 3, 2, 16, 2
PROMPT = [(5 * i + 3) % 89 + 1 for i in range(24)]  # 24 tokens: a multiple of 2 x cp x t
PROMPTS = [PROMPT[:1], PROMPT[3:8], PROMPT[:13]]  # the megatron engine pads these to 8 and 16 tokens inside
MODELS = ("qwen2", "deepseek-v3")  # packed qkv with bias, tied embeddings; MLA and MoE (experts split over TP)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron-cp")
    return {name: make_checkpoint(name, str(root / name)) for name in MODELS}, str(root)


def _train(model_dir, tp, cp, save_dir=None, resume_dir=None):
    """Losses, each step's gradients (Megatron's main_grad, after its DDP reduction) and the final weights."""
    from megatron.core import dist_checkpointing
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sp_core.models.checkpoint import export_state_dict
    from sp_core.mpu import platform
    from sp_core_megatron.cli_engine import engine, training

    model = engine.build_model(model_dir, tp, True, cp=cp)
    ddp, optimizer = training.wrap_for_training(model, clip_grad=0.0)
    data = training.token_stream(model.language_model.config.vocab_size, SEQ, BATCH, platform.current_device())
    start = 0
    if resume_dir:
        sharded = {"model": model.sharded_state_dict()}
        sharded["optimizer"] = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True)
        loaded = dist_checkpointing.load(sharded, resume_dir)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        start = SAVE_AT
        for _ in range(start):
            next(data)
    losses, grads = [], []
    for step in range(start, STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(forward_step_func=training.forward_step, data_iterator=data, model=[ddp],
                                          num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH,
                                          forward_only=False)
        grads.append(training.full_gradients(model))
        optimizer.step()
        losses.append(float(out[0]["lm loss"]))
        if save_dir and step + 1 == SAVE_AT:
            state = {"model": model.sharded_state_dict()}
            state["optimizer"] = optimizer.sharded_state_dict(state["model"])
            dist_checkpointing.save(state, save_dir)
    return {"losses": losses, "grads": grads, "weights": export_state_dict(model.language_model)}


def _gpt_model_logprobs(model_dir, tp, cp, prompt):
    """megatron.core's GPTModel with get_sp_core_block_spec at cp x tp (SP on), loaded from Hugging Face: the
    log-probabilities of ``prompt`` (its length a multiple of 2·cp·t), split by Megatron's
    get_batch_on_this_cp_rank and gathered back in order."""
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.utils import get_batch_on_this_cp_rank

    from sp_core import mpu
    from sp_core.layers import gather_vocab
    from sp_core.mpu import collectives
    from sp_core_megatron import get_sp_core_block_spec, gpt_model_args, load_hf_into_gpt_model, \
        transformer_config_from_hf

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = transformer_config_from_hf(model_dir, tp=tp, sequence_parallel=True, context_parallel_size=cp)
    model = GPTModel(config, get_sp_core_block_spec(config.num_layers), **gpt_model_args(config))
    load_hf_into_gpt_model(model, model_dir)
    parallel = mpu.default_context()  # the context the layers bound (Megatron's TP and CP groups)
    s = len(prompt)
    batch = get_batch_on_this_cp_rank({"tokens": torch.tensor([prompt]), "position_ids": torch.arange(s)[None],
                                       "order": torch.arange(s)[None]})
    with torch.no_grad():
        logits = gather_vocab(model(batch["tokens"], batch["position_ids"], None)[0], config.vocab_size, parallel)
    every, order = collectives.all_gather(parallel.cp, logits), collectives.all_gather(parallel.cp, batch["order"][0])
    return torch.log_softmax(torch.empty_like(every).index_copy_(0, order, every), -1)


def _rank(dirs, root, cp, tp):
    from sp_core_megatron.cli_engine import cpu_training

    cpu_training.enable()
    out = {}
    for name, model_dir in dirs.items():
        save_dir = os.path.join(root, f"dist-{name}")
        if cp == 2:
            out[name] = _train(model_dir, tp, cp, save_dir=save_dir)
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            out[name]["gpt_model"] = _gpt_model_logprobs(model_dir, tp, cp, PROMPT)
            parallel_state.destroy_model_parallel()
            from sp_core_megatron.cli_engine import engine

            out[name]["engine"] = engine.model_logprobs(engine.build_model(model_dir, tp, True, cp=cp).eval(), PROMPTS)
        else:
            out[name] = {"whole": _train(model_dir, tp, cp), "resumed": _train(model_dir, tp, cp, resume_dir=save_dir)}
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()  # the next model's build makes the groups again
    return out


@pytest.fixture(scope="module")
def runs(ckpts):
    dirs, root = ckpts
    for name in dirs:
        os.makedirs(os.path.join(root, f"dist-{name}"), exist_ok=True)
    cp2 = run_ranks(4, _rank, dirs, root, 2, 2, tp=2, cp=2)[0]  # saves the checkpoints the cp 1 launch resumes
    cp1 = run_ranks(2, _rank, dirs, root, 1, 2, tp=2)[0]
    return cp2, cp1


@pytest.mark.parametrize("name", MODELS)
def test_cp2_tp2_training_equals_cp1_tp2(runs, name):
    cp2, cp1 = runs[0][name], runs[1][name]["whole"]
    assert len(cp2["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(cp2["losses"], cp1["losses"]), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name} step {step}: loss {a} at cp 2 vs {b} at cp 1"
    for step, (mine, ref) in enumerate(zip(cp2["grads"], cp1["grads"]), start=1):
        assert mine.keys() == ref.keys()
        for key, grad in ref.items():
            assert rel(mine[key], grad) <= 1e-5, f"{name} step {step}: gradient of {key}"
    for key, w in cp1["weights"].items():
        assert rel(cp2["weights"][key], w) <= 1e-5, f"{name}: weight {key} after {STEPS} steps"


@pytest.mark.parametrize("name", MODELS)
def test_gpt_model_and_engine_at_cp2_tp2_equal_transformers(runs, ckpts, name):
    from sp_core.app.tiny import reference_logprobs

    got, ref = runs[0][name]["gpt_model"], reference_logprobs(ckpts[0][name], [PROMPT])[0]
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-4, f"{name}: GPTModel + core layers at cp 2"
    got, ref = runs[0][name]["engine"], reference_logprobs(ckpts[0][name], PROMPTS)
    assert [x.shape for x in got] == [x.shape for x in ref], "the engine's padding stays out of its output"
    assert max_diff(got, ref) <= 1e-4, f"{name}: the megatron engine's log-probabilities at cp 2 x tp 2"


@pytest.mark.parametrize("name", MODELS)
def test_dist_checkpoint_saved_at_cp2_resumes_at_cp1(runs, name):
    uninterrupted, resumed = runs[0][name]["losses"], runs[1][name]["resumed"]["losses"]
    assert len(resumed) == STEPS - SAVE_AT
    for step, (a, b) in enumerate(zip(resumed, uninterrupted[SAVE_AT:]), start=SAVE_AT + 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name} resumed at cp 1, step {step}: loss {a} vs {b} at cp 2"
