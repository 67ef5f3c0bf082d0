"""The Megatron adapter on the paths real training uses (gloo, CPU, real megatron-core): distributed
checkpoints across tp, packed documents and attention masks, fewer KV heads than tp, megatron.core's
own GPTModel with the core's layers loaded from Hugging Face, the export. References: transformers'
own model classes and the t = 1 run; stand-ins for CUDA-only bits: tests/support/megatron_cpu.py."""
import json
import os
import shutil

import pytest
import torch

from sp_core.app.tiny import PROMPTS, make_checkpoint, reference_logprobs
from support.compare import max_diff, rel
from support.host_sync import count_host_syncs
from support.multirank import run_ranks

DOCS = [[3, 17, 42, 8, 61], [5, 9, 2, 77], [12, 30, 4, 4, 50, 6, 21]]  # 16 tokens: a multiple of t


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron-paths")
    dirs = {name: make_checkpoint(name, str(root / name)) for name in ("qwen2", "qwen3")}
    # Megatron's loss includes its vocabulary padding columns, whose number depends on tp: for a
    # gradient comparison across tp, a vocabulary that needs no padding at t = 1 or 2
    # and RoPE theta 1e6 with linear scaling, which the core's layers must take from the config
    dirs["qwen3-v100"] = make_checkpoint("qwen3", str(root / "qwen3-v100"), vocab_size=100,
                                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    dirs["qwen2-v100"] = make_checkpoint("qwen2", str(root / "qwen2-v100"), vocab_size=100)
    return dirs


def _packed_batch():
    """The three documents packed into one sequence: THD parameters, Megatron's block-diagonal causal
    mask (True = masked out) with positions restarting per document, and per-document labels."""
    from megatron.core.packed_seq_params import PackedSeqParams

    ids = torch.tensor([sum(DOCS, [])])
    labels = torch.tensor([sum((d[1:] + [0] for d in DOCS), [])])
    cu = torch.tensor([0, 5, 9, 16], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([len(d) for d in DOCS]))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(len(d)) for d in DOCS]).unsqueeze(0)
    return ids, labels, packed, ~allowed.view(1, 1, 16, 16), positions


def _reference_doc_losses(model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for d in DOCS:
            logits = hf(torch.tensor([d])).logits[0]
            out.append(torch.nn.functional.cross_entropy(logits, torch.tensor(d[1:] + [0]), reduction="none"))
    return torch.cat(out)


# -- SPCoreGPTModel: packed documents, attention mask, fewer KV heads than tp, no host sync --------

def _packed_run(model_dir, tp):
    from sp_core import mpu
    from sp_core.layers.sharding import gather_full, packed_name
    from sp_core_megatron.cli_engine import cpu_training, engine

    cpu_training.enable()
    model = engine.build_model(model_dir, tp, tp > 1)
    ids, labels, packed, mask, positions = _packed_batch()
    with count_host_syncs() as syncs:
        loss = model(ids, torch.arange(16).unsqueeze(0), None, labels=labels, packed_seq_params=packed)
        loss.sum().backward()
    mpu.allreduce_sequence_parallel_grads(model.parameters())  # as finalize_model_grads does
    grads = {}
    for name, param in model.language_model.named_parameters():
        for shard, full in gather_full(param, param.grad).items():
            grads[f"{packed_name(name)}:{shard}"] = full.clone()
    with torch.no_grad():
        masked = model(ids, positions, mask, labels=labels)
    return loss.detach()[0], masked[0], dict(syncs), grads


def test_packed_documents_equal_each_document_alone(ckpts):
    """qwen3 has one KV head: at tp 2 it is replicated, and training must still equal t = 1."""
    d = ckpts["qwen3"]
    ref = _reference_doc_losses(d)
    base = run_ranks(1, _packed_run, d, 1)[0]
    thd, masked, syncs, grads = run_ranks(2, _packed_run, d, 2)[0]
    assert (thd - ref).abs().max() <= 1e-4, f"THD packed vs documents alone: {(thd - ref).abs().max()}"
    assert (masked - ref).abs().max() <= 1e-4, f"block-diagonal mask vs documents alone: {(masked - ref).abs().max()}"
    assert not syncs, f"the packed training step waited on the device: {syncs}"
    for key, grad in base[3].items():
        assert rel(grads[key], grad) <= 1e-5, f"tp 2 + SP vs t = 1: gradient of {key}"


# -- megatron.core's GPTModel with the core's layers, from a Hugging Face checkpoint ---------------

def _gpt_model(model_dir, tp, sp):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from sp_core_megatron import get_sp_core_block_spec, gpt_model_args, transformer_config_from_hf
    from sp_core_megatron.cli_engine import cpu_training

    cpu_training.enable()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = transformer_config_from_hf(model_dir, tp=tp, sequence_parallel=sp)
    return GPTModel(config, get_sp_core_block_spec(config.num_layers), **gpt_model_args(config))


def _gpt_logprobs(model, vocab, tp):
    from sp_core.layers import gather_vocab

    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            padded = prompt + [0] * (-len(prompt) % tp)  # Megatron's SP needs s divisible by tp (causal: harmless)
            ids = torch.tensor([padded])
            logits = model(ids, torch.arange(len(padded)).unsqueeze(0), None)[0]
            out.append(torch.log_softmax(gather_vocab(logits, vocab), -1)[: len(prompt)])
        ids, labels, packed, _, _ = _packed_batch()
        logits = model(ids, None, None, packed_seq_params=packed)[0]
        logprobs = torch.log_softmax(gather_vocab(logits, vocab), -1)
        packed_loss = -logprobs.gather(-1, labels[0].unsqueeze(-1)).squeeze(-1)
    return out, packed_loss


def _gpt_run(model_dir, tp, sp, save_dir=None, load_dir=None):
    from megatron.core import dist_checkpointing
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sp_core.layers.sharding import gather_full, packed_name
    from sp_core_megatron import load_hf_into_gpt_model
    from sp_core_megatron.cli_engine import training

    model = _gpt_model(model_dir, tp, sp)
    config = model.config
    fields = {k: getattr(config, k) for k in ("qk_layernorm", "add_qkv_bias", "rotary_base", "rope_scaling_config",
                                               "share_embeddings_and_output_weights", "vocab_size")}
    if load_dir:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), load_dir))
    else:
        load_hf_into_gpt_model(model, model_dir)
    if save_dir:
        dist_checkpointing.save(model.sharded_state_dict(), save_dir)
    logprobs, packed_loss = _gpt_logprobs(model, config.vocab_size, tp)
    # one training step through Megatron's DDP and finalize_model_grads (qk_layernorm on for Qwen3)
    ddp, _ = training.wrap_for_training(model, clip_grad=0.0)
    data = training.token_stream(config.vocab_size, 16, 2, "cpu")
    ddp.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=training.forward_step, data_iterator=data, model=[ddp],
                                num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=False)
    grads = {}
    for name, param in model.named_parameters():
        if name.startswith("decoder."):
            for shard, full in gather_full(param, param.main_grad).items():
                grads[f"{packed_name(name)}:{shard}"] = full.clone()
    return fields, logprobs, packed_loss, grads


def _expected_fields(model_dir):
    hf = json.load(open(os.path.join(model_dir, "config.json")))
    qwen3 = hf["architectures"] == ["Qwen3ForCausalLM"]
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta"))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    return dict(qk_layernorm=qwen3, add_qkv_bias=not qwen3, rotary_base=theta, rope_scaling_config=scaling,
                share_embeddings_and_output_weights=hf["tie_word_embeddings"], vocab_size=hf["vocab_size"])


def test_gpt_model_with_core_layers_from_hf_equals_transformers(ckpts, tmp_path):
    """megatron.core's GPTModel + get_sp_core_block_spec + transformer_config_from_hf + the HF name mapping,
    at tp 2 with SP, against transformers: qwen2 (qkv bias, tied embeddings, vocab 97 padded to 98) and
    qwen3 (q/k norm, one KV head replicated over tp, RoPE theta 1e6 with linear scaling). Packed documents through GPTModel equal each
    document alone. The tp 2 distributed checkpoint of this path loads at tp 1.

    Gradients (tp 2 + SP vs t = 1) go through Megatron's finalize_model_grads with qk_layernorm=True,
    which sums over TP any gradient named *q_layernorm* / *k_layernorm*: the core's q/k norms (already
    summed inside autograd) must not be summed twice; the replicated KV head's gradient must be summed
    over its replicas."""
    dist_dir = str(tmp_path / "dist")
    os.makedirs(dist_dir)
    runs = {}
    for name in ("qwen2", "qwen3-v100"):
        d = ckpts[name]
        runs[name] = fields, logprobs, packed_loss, grads = run_ranks(
            2, _gpt_run, d, 2, True, dist_dir if name == "qwen3-v100" else None)[0]
        assert fields == _expected_fields(d)
        assert max_diff(logprobs, reference_logprobs(d, PROMPTS)) <= 1e-4, f"{name}: GPTModel + core layers"
        assert (packed_loss - _reference_doc_losses(d)).abs().max() <= 1e-4, f"{name}: packed documents"
    d = ckpts["qwen3-v100"]
    _, logprobs, _, base = run_ranks(1, _gpt_run, d, 1, False, None, dist_dir)[0]  # resumed from the tp 2 save
    assert max_diff(logprobs, reference_logprobs(d, PROMPTS)) <= 1e-4, "tp 2 dist checkpoint loaded at tp 1"
    grads = runs["qwen3-v100"][3]
    assert any("q_norm" in k for k in base) and not any("q_layernorm" in k or "k_layernorm" in k for k in base)
    assert grads.keys() == base.keys()
    for key, grad in base.items():
        assert rel(grads[key], grad) <= 1e-5, f"GPTModel + core layers tp 2 + SP vs t = 1: gradient of {key}"


def _load_into_gpt_model(model_dir):
    from sp_core_megatron import load_hf_into_gpt_model

    load_hf_into_gpt_model(_gpt_model(model_dir, 1, False), model_dir)


def test_load_hf_into_gpt_model_refuses_nan(ckpts, tmp_path):
    """As the core's loader: one line naming the tensor, a ModelError, which the command line turns into exit 2."""
    from safetensors.torch import load_file, save_file

    from sp_core.app.cli import _EXIT_BY_ERROR
    from support.multirank import RankFailed

    d = str(tmp_path / "nan")
    shutil.copytree(ckpts["qwen3"], d)
    weights = load_file(os.path.join(d, "model.safetensors"))
    weights["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("inf")
    save_file(weights, os.path.join(d, "model.safetensors"))
    with pytest.raises(RankFailed) as failed:
        run_ranks(1, _load_into_gpt_model, d)
    assert failed.value.error_message == "checkpoint tensor model.layers.1.self_attn.k_proj.weight contains NaN or inf"
    assert _EXIT_BY_ERROR[failed.value.error_type] == 2


# -- fewer KV heads than tp: Megatron's gradient norm and clipping -----------------------------------

def _clipped_step(model_dirs, tp):
    """Per checkpoint: Megatron's gradient norm of one step, and the update its optimizer made (SGD, lr 1,
    clipped to norm 1: the update is the gradient scaled by 1 / that norm)."""
    from sp_core.models.checkpoint import export_state_dict
    from sp_core_megatron.cli_engine import engine, training
    from support.megatron_cpu import allow_cpu_grad_clipping, install_megatron_cpu_shims

    allow_cpu_grad_clipping()
    install_megatron_cpu_shims()
    out = []
    for d in model_dirs:
        model = engine.build_model(d, tp, tp == 4)
        before, norms = export_state_dict(model.language_model), []
        training.train(model, 1, lr=1.0, clip_grad=1.0, optimizer="sgd", grad_norms=norms)
        after = export_state_dict(model.language_model)
        out.append((norms[0], {k: after[k] - before[k] for k in before}))
    return out


def test_grad_norm_and_clipping_count_replicated_kv_heads_once(ckpts):
    """qwen3: one KV head (2 and 4 holders at tp 2 / 4); qwen2: two (tp 4: 2 holders; qkv bias). Megatron
    counts a parameter tagged tensor_model_parallel on every TP rank: a KV head counted on each holder
    inflated the norm and shrank every clipped update against t = 1. tp 2 without SP, tp 4 with SP."""
    dirs = [ckpts["qwen3-v100"], ckpts["qwen2-v100"]]
    base = run_ranks(1, _clipped_step, dirs, 1)[0]
    for tp in (2, 4):
        got = run_ranks(tp, _clipped_step, dirs, tp, sequence_parallel=tp == 4)[0]
        for d, (norm, update), (ref_norm, ref_update) in zip(dirs, got, base):
            assert ref_norm > 1, "the step must clip"
            assert abs(norm - ref_norm) <= 1e-5 * ref_norm, f"{d} tp {tp}: grad norm {norm} vs t = 1 {ref_norm}"
            for key, ref in ref_update.items():
                assert rel(update[key], ref) <= 1e-5, f"{d} tp {tp}: clipped update of {key}"


# -- distributed checkpoints: save at tp 2, resume at tp 2 and at tp 1 ------------------------------

def _train_with_checkpoint(model_dir, tp, steps, save_at, save_dir=None, resume_dir=None,
                           distributed_optimizer=False):
    """Adam on a global batch of 2 sequences (each data-parallel rank its share); saves the model and the
    optimizer after step ``save_at`` or resumes there. With Megatron's distributed optimizer, in its format
    ``fully_sharded_model_space`` (the default without metadata), which hands the model's tensors flattened
    ranges. Runs on GPUs too (scripts/megatron_pretrain_gpu.sh distopt)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sp_core.mpu import collectives, platform
    from sp_core_megatron.cli_engine import cpu_training, engine, training
    from support.megatron_cpu import adam_state_before_loading, distributed_optimizer_on_cpu

    cpu_training.enable()
    distributed_optimizer_on_cpu()
    model = engine.build_model(model_dir, tp, tp > 1)
    ddp, optimizer = training.wrap_for_training(model, clip_grad=0.0, distributed_optimizer=distributed_optimizer)
    dp = parallel_state.get_data_parallel_world_size()
    data = training.data_parallel_share(
        training.token_stream(model.language_model.config.vocab_size, 16, 2, platform.current_device()), 2 // dp)
    start = 0
    if resume_dir:
        if distributed_optimizer:
            adam_state_before_loading(optimizer)
        sharded = {"model": model.sharded_state_dict()}
        sharded["optimizer"] = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                                            metadata=_FLAT_FORMAT)
        loaded = dist_checkpointing.load(sharded, resume_dir)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        start = save_at
        for _ in range(start):
            next(data)
    losses = []
    for step in range(start, steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(forward_step_func=training.forward_step, data_iterator=data, model=[ddp],
                                          num_microbatches=1, seq_length=16, micro_batch_size=2 // dp,
                                          forward_only=False)
        optimizer.step()
        losses.append(float(collectives.mean_over_group(model.parallel, out[0]["lm loss"], parallel_state.get_data_parallel_group())))
        if save_dir and step + 1 == save_at:
            state = {"model": model.sharded_state_dict()}
            state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=_FLAT_FORMAT)
            dist_checkpointing.save(state, save_dir)
    return losses


_FLAT_FORMAT = {"distrib_optim_sharding_type": "fully_sharded_model_space"}  # ignored by the plain optimizer


def test_dist_checkpoint_at_tp2_resumes_at_tp2_and_tp1(ckpts, tmp_path):
    """qwen2: packed qkv (with bias) and gate/up, tied embeddings, vocab 97 padded to 98 at tp 2; Adam's
    state goes through the same pieces (Megatron's optimizer.sharded_state_dict)."""
    d = ckpts["qwen2"]
    save_dir = str(tmp_path / "dist")
    os.makedirs(save_dir)
    uninterrupted = run_ranks(2, _train_with_checkpoint, d, 2, 4, 2, save_dir)[0]  # saves after step 2
    for tp in (2, 1):
        resumed = run_ranks(tp, _train_with_checkpoint, d, tp, 4, 2, None, save_dir)[0]
        for step, (a, b) in enumerate(zip(resumed, uninterrupted[2:]), start=3):
            assert abs(a - b) <= 1e-6, f"resumed at tp {tp}, step {step}: loss {a} vs uninterrupted {b}"


def test_dist_checkpoint_with_the_distributed_optimizer_moves_from_dp2_to_tp2(ckpts, tmp_path):
    """Megatron's distributed optimizer, its default checkpoint format: saved at tp 1 x dp 2 (each rank holds
    part of each bucket, so the flattened ranges cut parameters and the q / k / v pieces anywhere), resumed
    at tp 2 x dp 1 (qwen2: packed qkv with bias, gate / up, vocabulary 97 padded to 98): Adam continues
    as if never stopped."""
    d = ckpts["qwen2"]
    save_dir = str(tmp_path / "dist")
    os.makedirs(save_dir)
    uninterrupted = run_ranks(2, _train_with_checkpoint, d, 1, 4, 2, save_dir, None, True, tp=1)[0]
    resumed = run_ranks(2, _train_with_checkpoint, d, 2, 4, 2, None, save_dir, True)[0]
    for step, (a, b) in enumerate(zip(resumed, uninterrupted[2:]), start=3):
        assert abs(a - b) <= 1e-5, f"resumed at tp 2, step {step}: loss {a} vs uninterrupted {b}"


# -- export: one writer, sharded with an index -------------------------------------------------------

def _export(model_dir, out_dir):
    import torch.distributed as dist

    from sp_core import mpu
    from sp_core_megatron import export_hf_checkpoint
    from sp_core_megatron.cli_engine import engine

    model = engine.build_model(model_dir, 2, True)  # 4 ranks: tp 2 x dp 2
    with mpu.counting_collectives() as issued:
        files = export_hf_checkpoint(model, out_dir, max_shard_bytes=24_000)
    return dist.get_rank(), files, dict(issued)


def test_export_has_one_writer_and_shards_with_an_index(ckpts, tmp_path):
    from safetensors.torch import load_file

    d, out = ckpts["qwen3"], str(tmp_path / "export")
    results = run_ranks(4, _export, d, out, tp=2)
    by_rank = {rank: (files, issued) for rank, files, issued in results}
    assert by_rank[0][0] and not any(by_rank[r][0] for r in (1, 2, 3)), "only tp 0 of dp 0 writes"
    assert set(by_rank[1][1]) == {"gather"}, f"the other TP rank only sends its slices: {by_rank[1][1]}"
    assert by_rank[2][1] == {} and by_rank[3][1] == {}, "the second data-parallel replica takes no part"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(os.path.basename(f) for f in by_rank[0][0]) == files
    original = load_file(os.path.join(d, "model.safetensors"))
    exported = {}
    for f in files:
        exported.update(load_file(os.path.join(out, f)))
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    assert max_diff(reference_logprobs(out, PROMPTS), reference_logprobs(d, PROMPTS)) <= 1e-5  # transformers reads it
