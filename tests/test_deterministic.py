"""The deterministic mode (issue 20): Megatron and sglang give bit-identical log-probabilities, with SP on
and off, and a sequence's log-probabilities do not depend on the batch around it.

CPU, float32, the real engines. Few launches: one 2-rank Megatron run, for each model (Qwen3, DeepSeek-V3),
trains (deterministic_mode), exports, computes its log-probabilities with SP on and off (DeepSeek-V3 also
with expert parallelism) and checks its own micro-batch invariance; per model one sglang tp 2 engine (--enable-deterministic-inference,
--enable-layernorm-sp) serves the export; `sp-core logits --deterministic` runs both engines at tp 1 (Qwen2).
DeepSeek-V3.2 (its indexer selecting keys): the same launch computes Megatron's log-probabilities of the tiny
checkpoint, and one sglang tp 2 engine serves it. Negative controls: the default mode on the same Megatron
model is not batch-invariant; torch's own CPU
matmul is not (measured here). Sums over TP at t = 4 are in tests/test_operators.py.
"""
import collections
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from sp_core import mpu
from sp_core.kernels import batch_invariant
from sp_core.app.tiny import PROMPTS, make_checkpoint
from support.multirank import run_ranks
from support.contexts import remake, single_process

LONG = [int(t) for t in torch.randint(0, 100, (17,), generator=torch.Generator().manual_seed(3))]
# 8 requests at once, 1 to 30 tokens, LONG among them
CONCURRENT = [[int(t) for t in torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n))]
              for n in (5, 1, 30, 3)] + [LONG] + [[7, 7, 2], [int(t) for t in range(40, 62)], [9]]
EVEN = [p for p in CONCURRENT if len(p) % 2 == 0]  # 30 and 22 tokens
SP_MIN_TOKENS = 8  # sglang: batches of fewer tokens run plain TP (SP off), the others SP
MICRO_BATCH = 4
ARCHS = ("qwen3", "deepseek-v3")
SPARSE = "deepseek-v32"  # index_topk 3: sparse attention in every prompt longer than 3 tokens


def test_plain_cpu_matmul_depends_on_rows_blocked_gemms_do_not():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g), torch.randn(48, 64, generator=g)
    full = x @ w.t()
    assert any(not torch.equal((x[:m] @ w.t()), full[:m]) for m in range(1, 12)), \
        "negative control: torch's CPU matmul came out batch-invariant on this machine"
    with single_process(deterministic=True):
        with batch_invariant.gemms(True):
            blocked = F.linear(x, w)
            bias = torch.randn(96, generator=g)
            for m in range(1, 41):
                assert torch.equal(F.linear(x[:m], w), blocked[:m]), m
                assert torch.equal(x[:m] @ w.t(), blocked[:m]), m
                assert torch.equal(torch.matmul(x[:m].view(1, m, 64), w.t())[0], blocked[:m]), m
                assert torch.equal(torch.addmm(bias, x[:m], w.t()), blocked[:m] + bias), m
    torch.testing.assert_close(blocked, full, rtol=1e-5, atol=1e-5)  # the same product


def test_cpu_grouped_mm_and_sigmoid_depend_on_rows_blocked_ones_do_not():
    """The MoE's two other batch-dependent CPU kernels (measured here): the experts' grouped GEMM (a token's
    row changes with how many tokens share its expert) and the V3 router's sigmoid (ATen's scalar tail)."""
    g = torch.Generator().manual_seed(0)
    w, x, logits = torch.randn(4, 64, 32, generator=g), torch.randn(40, 64, generator=g), torch.randn(80, 8, generator=g)

    def grouped(rows, first):  # expert 0 gets ``first`` rows, experts 1-3 ten each
        x_rows = torch.cat([x[:first], x[10:40]])
        return torch._grouped_mm(x_rows, w, offs=torch.tensor([first] + rows).cumsum(0).to(torch.int32))

    def changes(fn):
        full = fn(10)
        return [n for n in range(1, 10) if not torch.equal(fn(n)[:n], full[:n]) or not torch.equal(fn(n)[n:], full[10:])]

    def sigmoid_changes(fn):
        full = fn(logits)
        return [m for m in range(1, 80) if not torch.equal(fn(logits[:m]), full[:m])]

    assert changes(lambda n: grouped([10, 10, 10], n)), "negative control: CPU _grouped_mm came out batch-invariant"
    assert sigmoid_changes(torch.sigmoid), "negative control: CPU sigmoid came out batch-invariant"
    with single_process(deterministic=True):
        with batch_invariant.gemms(True):
            assert changes(lambda n: grouped([10, 10, 10], n)) == []
            assert sigmoid_changes(lambda t: batch_invariant.elementwise(torch.sigmoid, t)) == []


def _micro_batch_logits(model, prompt):
    """Local-vocab logits of ``prompt`` alone (b = 1) and as sequence 0 of a micro-batch of 4 (b = 4)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    others = torch.randint(0, model.hf_config.vocab_size, (MICRO_BATCH - 1, len(prompt)),
                           generator=torch.Generator().manual_seed(11)).to(device)
    batch = torch.cat([ids, others])
    positions = torch.arange(len(prompt), device=device)
    with torch.no_grad():
        alone = model(ids, positions.unsqueeze(0), None)[0]
        inside = model(batch, positions.expand(MICRO_BATCH, -1), None)[0]
    return alone, inside


def _train_export_checks(model_dirs, out_dirs, prompts):
    """In each rank, for every model in turn (Megatron's groups rebuilt): ``_train_export_check``."""
    from megatron.core import parallel_state

    results = {}
    for arch in ARCHS:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        results[arch] = _train_export_check(model_dirs[arch], out_dirs[arch], prompts)
    parallel_state.destroy_model_parallel()
    results[SPARSE] = _sp_on_and_off_logprobs(model_dirs[SPARSE], prompts)
    return results


def _sp_on_and_off_logprobs(model_dir, prompts):
    """The deterministic Megatron model (tp 2) as loaded: log-probabilities with SP on and off."""
    from sp_core_megatron.cli_engine.engine import build_model, model_logprobs

    model = build_model(model_dir, 2, True, deterministic=True).eval()
    sp_on = model_logprobs(model, prompts)
    model.config.sequence_parallel = False
    return sp_on, model_logprobs(model, prompts)


def _train_export_check(model_dir, out_dir, prompts):
    from sp_core_megatron.cli_engine import cpu_training, training
    from sp_core_megatron.cli_engine.engine import build_model, model_logprobs
    from sp_core_megatron.export import export_hf_checkpoint

    cpu_training.enable()
    model = build_model(model_dir, 2, True, deterministic=True)  # Megatron's deterministic_mode
    assert mpu.default_context().deterministic
    _, losses, _ = training.train(model, 2, seq_length=16, micro_batch_size=2, clip_grad=0.0)
    model.eval()
    export_hf_checkpoint(model, out_dir)
    trained = model_logprobs(model, prompts)
    model.config.sequence_parallel = False  # the same model with Megatron's SP switch off
    trained_sp_off = model_logprobs(model, prompts)
    model.config.sequence_parallel = True
    # 2 tokens: alone, its GEMMs have 2 rows, which torch's CPU kernels compute differently from 8 (in the
    # default mode here, sequences of 1 and 2 tokens at tp 2 changed in a micro-batch of 4; 3 to 12 did not)
    short = [7, 60]
    invariant = all(torch.equal(*_micro_batch_logits(model, p)) for p in (short, PROMPTS[0], LONG))
    packed = _packed_logprobs(model, prompts[:3], model.language_model.config.vocab_size)
    default_mode = build_model(model_dir, 2, True, deterministic=False)  # the same weights, Megatron's default mode
    default_mode.load_state_dict(model.state_dict())
    default_invariant = torch.equal(*_micro_batch_logits(default_mode, short))
    layer_spec = _gpt_model_with_core_spec(out_dir, EVEN, prompts[:3])
    return (trained, trained_sp_off, invariant, default_invariant, _expert_parallel_sp_on_off(model_dir, prompts),
            packed, layer_spec)


def _packed_rows(prompts, t):
    """One row of ``prompts`` packed one after another (a final filler document pads it to a multiple of
    t, as Megatron's SP needs): ids [1, s], positions restarting at 0 in every document, cu_seqlens."""
    lengths = [len(p) for p in prompts]
    filler = -sum(lengths) % t
    ids = torch.tensor([sum(prompts, []) + [0] * filler])
    positions = torch.cat([torch.arange(n) for n in lengths + ([filler] if filler else [])]).unsqueeze(0)
    cu = torch.tensor([0] + lengths + ([filler] if filler else []), dtype=torch.int32).cumsum(0).to(torch.int32)
    return ids, positions, cu


def _packed_logprobs(model, prompts, vocab, forms=("thd", "mask")):
    """Each prompt's log-probabilities from one packed row: THD (``packed_seq_params``) and Megatron's
    --reset-attention-mask form (a block-diagonal attention_mask, positions restarting per document)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from sp_core.layers import gather_vocab

    ids, positions, cu = _packed_rows(prompts, mpu.default_context().size)
    s = ids.shape[1]
    doc = torch.searchsorted(cu[1:], torch.arange(s), right=True)
    masked_out = ~((doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool).tril())
    out = {}
    with torch.no_grad():
        for form in forms:
            if form == "thd":
                packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                         max_seqlen_q=s, max_seqlen_kv=s)
                logits = model(ids, None, None, packed_seq_params=packed)[0]
            else:
                logits = model(ids, positions, masked_out.view(1, 1, s, s))[0]
            logprobs = torch.log_softmax(gather_vocab(logits, vocab).float(), -1)
            out[form] = [logprobs[lo:hi] for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist())][:len(prompts)]
    return out


def _gpt_model_with_core_spec(export_dir, prompts, packed_prompts):
    """megatron.core's GPTModel + get_sp_core_block_spec (deterministic_mode, SP) loading the export:
    log-probabilities of each of ``prompts`` alone (even lengths: Megatron's SP needs s divisible by t, and
    a padding token would lengthen the sequence the attention kernel sees) and of ``packed_prompts`` THD-packed."""
    from megatron.core.models.gpt import GPTModel

    from sp_core_megatron import get_sp_core_block_spec, gpt_model_args, load_hf_into_gpt_model
    from sp_core_megatron.config import transformer_config_from_hf
    from sp_core.layers import gather_vocab

    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = transformer_config_from_hf(export_dir, tp=2, sequence_parallel=True, deterministic_mode=True)
    model = GPTModel(config, get_sp_core_block_spec(config.num_layers), **gpt_model_args(config)).eval()
    load_hf_into_gpt_model(model, export_dir)
    alone = []
    with torch.no_grad():
        for prompt in prompts:
            logits = model(torch.tensor([prompt]), torch.arange(len(prompt)).unsqueeze(0), None)[0]
            alone.append(torch.log_softmax(gather_vocab(logits, config.vocab_size).float(), -1))
    return alone, _packed_logprobs(model, packed_prompts, config.vocab_size, forms=("thd",))["thd"]


def _expert_parallel_sp_on_off(model_dir, prompts):
    """MoE models with expert parallelism (moe=ep), deterministic_mode: whether SP on and off give
    torch.equal log-probabilities (None for a dense model)."""
    from sp_core.models import ModelConfig
    from sp_core_megatron.cli_engine.engine import build_model, model_logprobs

    from megatron.core import parallel_state

    if ModelConfig.from_pretrained(model_dir).moe is None:
        return None
    parallel_state.destroy_model_parallel()  # the expert-parallel groups are set up with the model
    model = build_model(model_dir, 2, True, moe_parallel="ep", deterministic=True).eval()
    sp_on = model_logprobs(model, prompts)
    model.config.sequence_parallel = False
    sp_off = model_logprobs(model, prompts)
    return all(torch.equal(a, b) for a, b in zip(sp_on, sp_off))


def _reduce_scatters(log_path):
    """reduce-scatters logged by the workers since the last call (the log is cleared)."""
    if not os.path.exists(log_path):
        return 0
    with open(log_path) as f:
        ops = collections.Counter(line.split(" ")[1] for line in f.read().splitlines())
    os.remove(log_path)
    return ops["reduce_scatter"]


@pytest.fixture(scope="module")
def trained_in_megatron(tmp_path_factory):
    """One 2-rank Megatron launch for every model of ARCHS: arch -> (export dir, ``_train_export_check``'s
    results)."""
    root = tmp_path_factory.mktemp("megatron")
    dirs = {arch: make_checkpoint(arch, str(root / arch)) for arch in ARCHS + (SPARSE,)}
    exports = {arch: str(root / f"{arch}-export") for arch in ARCHS}
    results = run_ranks(2, _train_export_checks, dirs, exports, PROMPTS + [LONG])[0]
    return dict({arch: (exports[arch], results[arch]) for arch in ARCHS}, **{SPARSE: (dirs[SPARSE], results[SPARSE])})


@pytest.mark.timeout(900)
@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed")
@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
@pytest.mark.parametrize("arch", ARCHS)
def test_megatron_and_sglang_bitwise_tp2_round_trip_and_batch_invariance(arch, trained_in_megatron, tmp_path,
                                                                         monkeypatch):
    """tp 2: train in Megatron (SP on, deterministic_mode), export, serve in sglang
    (--enable-deterministic-inference, layernorm SP): sglang's log-probabilities are torch.equal to the
    trained Megatron model's own, with SP on (batches of >= 8 tokens) and off (shorter ones, against the
    same Megatron model with SP off); a prompt alone == inside 8 concurrent requests; Megatron: a sequence
    alone == inside a micro-batch of 4 (and, the negative control, not in the default mode). DeepSeek-V3:
    MLA (sglang: its latent KV cache read back, the expanded form) and the MoE (experts grouped over
    whatever tokens the batch holds)."""
    from sp_core_sglang.cli_engine.engine import logprobs_for_prompts, start_engine

    prompts = PROMPTS + [LONG]
    export, (trained, trained_sp_off, invariant, default_invariant, ep_sp_equal, packed, layer_spec) = \
        trained_in_megatron[arch]
    assert invariant, "Megatron, deterministic: a sequence alone != inside a micro-batch of 4"
    assert not default_invariant, "negative control: the default mode came out batch-invariant here"
    assert all(torch.equal(a, b) for a, b in zip(trained, trained_sp_off)), "Megatron: SP on != SP off"
    assert ep_sp_equal in ((None,) if arch.startswith("qwen") else (True,)), \
        f"Megatron, deterministic, moe=ep: SP on != SP off ({ep_sp_equal})"
    for form, got in packed.items():
        for i, lp in enumerate(got):
            assert torch.equal(lp, trained[i]), f"Megatron, {form}-packed documents: prompt {i} != the prompt alone"
    spec_alone, spec_packed = layer_spec

    with open(os.path.join(export, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    log_path = str(tmp_path / "collectives.log")
    monkeypatch.setenv("SP_CORE_COLLECTIVE_LOG", log_path)  # the workers inherit it at start
    engine = start_engine(export, 2, adapter=True, sp_min_tokens=SP_MIN_TOKENS, enable_layernorm_sp=True,
                          enable_deterministic_inference=True, disable_radix_cache=True)
    try:
        _reduce_scatters(log_path)
        short_alone = [logprobs_for_prompts(engine, [p], vocab)[0] for p in PROMPTS]  # < 8 tokens: SP off
        assert _reduce_scatters(log_path) == 0, "short prompts alone should run plain TP"
        together = logprobs_for_prompts(engine, prompts, vocab)  # 28 tokens: SP
        assert _reduce_scatters(log_path) > 0, "the batch should run SP"
        long_alone = logprobs_for_prompts(engine, [LONG], vocab)[0]  # 17 tokens: SP
        assert _reduce_scatters(log_path) > 0, "a prompt of 17 tokens alone should run SP"
        concurrent = logprobs_for_prompts(engine, CONCURRENT, vocab)
    finally:
        engine.shutdown()

    for i, want in enumerate(trained):
        assert torch.equal(together[i], want), f"sglang SP on != Megatron (trained, SP on), prompt {i}"
    for i, got in enumerate(short_alone):
        assert torch.equal(got, trained_sp_off[i]), f"sglang SP off != Megatron (trained, SP off), prompt {i}"
    assert torch.equal(concurrent[CONCURRENT.index(LONG)], long_alone), \
        "sglang SP: a prompt inside 8 concurrent requests != the prompt alone"
    assert torch.equal(long_alone, trained[-1]), "sglang SP, a prompt alone != Megatron"
    for prompt, got in zip(EVEN, spec_alone):
        assert torch.equal(got, concurrent[CONCURRENT.index(prompt)]), \
            f"GPTModel + the core's layer spec != sglang, a prompt of {len(prompt)} tokens"
    for i, got in enumerate(spec_packed):
        assert torch.equal(got, together[i]), f"GPTModel + the core's layer spec, THD-packed != sglang, prompt {i}"


@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed")
@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_v32_sparse_attention_megatron_and_sglang_bitwise_tp2(trained_in_megatron):
    """DeepSeek-V3.2 with its indexer selecting keys (index_topk 3 < the prompts): sglang (tp 2,
    --enable-deterministic-inference, radix cache on) gives torch.equal log-probabilities to Megatron's
    (deterministic_mode; within 1e-4 of transformers), SP on and off, and for a prompt extended over its
    cached prefix (the selection then names prefix rows read back from the KV cache)."""
    from sp_core_sglang.cli_engine.engine import logprobs_for_prompts, start_engine

    from sp_core.app.tiny import reference_logprobs

    model_dir, (sp_on, sp_off) = trained_in_megatron[SPARSE]
    assert all(torch.equal(a, b) for a, b in zip(sp_on, sp_off)), "Megatron: SP on != SP off"
    reference = reference_logprobs(model_dir, PROMPTS + [LONG])  # transformers, sparse attention
    assert max((a - b).abs().max().item() for a, b in zip(sp_on, reference)) <= 1e-4, "Megatron != transformers"
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    engine = start_engine(model_dir, 2, adapter=True, sp_min_tokens=SP_MIN_TOKENS, enable_layernorm_sp=True,
                          enable_deterministic_inference=True)
    try:
        together = logprobs_for_prompts(engine, PROMPTS + [LONG], vocab)  # 28 tokens: SP
        alone = logprobs_for_prompts(engine, [PROMPTS[0]], vocab)  # 5 tokens (< 8): SP off
        engine.generate(input_ids=LONG[:12], sampling_params={"temperature": 0.0, "max_new_tokens": 1})
        out = engine.generate(input_ids=LONG, sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                              return_logprob=True, logprob_start_len=len(LONG) - 3)
    finally:
        engine.shutdown()
    for i, want in enumerate(sp_on):
        assert torch.equal(together[i], want), f"sglang SP on != Megatron SP on, prompt {i}"
    for i, got in enumerate(alone):
        assert torch.equal(got, sp_off[i]), f"sglang SP off != Megatron SP off, prompt {i}"
    assert out["meta_info"]["cached_tokens"] > 3, out["meta_info"]["cached_tokens"]
    served = [lp for lp, *_ in out["meta_info"]["input_token_logprobs"][-2:]]
    assert served == [sp_on[-1][p - 1, LONG[p]].item() for p in (len(LONG) - 2, len(LONG) - 1)], \
        "sglang over a cached prefix != Megatron"


@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed")
@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_cli_logits_deterministic_megatron_equals_sglang_tp1(tmp_path):
    """`sp-core logits --deterministic` as a user runs it, Qwen2 at tp 1: the two files are torch.equal."""
    from safetensors.torch import load_file

    from sp_core.app.cli import main

    model_dir = make_checkpoint("qwen2", str(tmp_path / "qwen2"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS + [LONG]))
    outs = {}
    for engine in ("megatron", "sglang"):
        outs[engine] = str(tmp_path / f"{engine}.safetensors")
        assert main(["logits", "--model", model_dir, "--prompts", str(prompts), "--out", outs[engine],
                     "--engine", engine, "--deterministic"]) == 0
    megatron, sglang = load_file(outs["megatron"]), load_file(outs["sglang"])
    assert sorted(megatron) == sorted(sglang) == [f"logprobs.{i}" for i in range(len(PROMPTS) + 1)]
    for key in megatron:
        assert torch.equal(megatron[key], sglang[key]), key


def test_verify_bitwise_column_fails_a_pair_that_differs_in_the_last_bit(tmp_path):
    """`verify --deterministic`'s judgement, with stand-in engines around transformers' own numbers: a
    megatron / sglang pair one ulp apart (well within the 1e-4 tolerance) fails; an equal pair passes."""
    from types import SimpleNamespace

    from sp_core.app import verify

    model_dir = make_checkpoint("qwen3", str(tmp_path / "qwen3"))
    reference = verify.reference_logprobs(model_dir, PROMPTS)
    seen = []

    def engine(nudge):
        def logprobs(model_dir, prompts, tp, sp, dtype, deterministic=False):
            seen.append(deterministic)
            return [torch.nextafter(r, r + 1) if nudge and tp == 2 and sp else r.clone() for r in reference]
        return SimpleNamespace(logprobs=logprobs)

    usable = {"megatron": engine(False), "sglang": engine(True)}
    rows, _ = verify.plan({"qwen3": model_dir}, [1, 2], usable, default_matrix=False)
    rows = verify.run_rows(rows, {"qwen3": model_dir}, usable, {}, verify.Progress(2), deterministic=True)
    assert all(seen) and len(rows) == 6
    bitwise = {(r.engine, r.tp, r.sp): (r.bitwise, r.passed) for r in rows}
    assert bitwise[("megatron", 2, True)] == bitwise[("sglang", 2, True)] == (False, False)
    assert all(v == (True, True) for k, v in bitwise.items() if k[1:] != (2, True))
    header, *lines = verify.table(rows, deterministic=True).splitlines()
    at = header.index("bitwise")
    assert [line[at:at + len("bitwise")].strip() for line in lines[:2]] == ["FALSE", "FALSE"]
    assert "bitwise" not in verify.table(rows).splitlines()[0]


def test_verify_deterministic_fails_sp_on_that_differs_from_sp_off_in_the_last_bit(tmp_path):
    """`verify --deterministic` also compares each engine's SP-on row with its SP-off row bit for bit, and
    runs expert parallelism with SP off for it: a stand-in core whose moe=ep SP-on result is one ulp off
    its SP-off result (well within the 1e-5 SP tolerance) fails that row only."""
    from types import SimpleNamespace

    from sp_core.app import verify

    model_dir = make_checkpoint("deepseek-v3", str(tmp_path / "deepseek-v3"))
    reference = verify.reference_logprobs(model_dir, PROMPTS)

    def logprobs(model_dir, prompts, tp, sp, dtype, deterministic=False, moe_parallel="tp"):
        assert deterministic
        nudge = sp and moe_parallel == "ep"
        return [torch.nextafter(r, r + 1) if nudge else r.clone() for r in reference]

    usable = {"core": SimpleNamespace(logprobs=logprobs)}
    rows, _ = verify.plan({"deepseek-v3": model_dir}, [2], usable, default_matrix=False, deterministic=True)
    assert [(r.tp, r.sp, r.moe) for r in rows] == [(2, False, "tp"), (2, True, "tp"), (2, False, "ep"), (2, True, "ep")]
    rows = verify.run_rows(rows, {"deepseek-v3": model_dir}, usable, {}, verify.Progress(2), deterministic=True)
    status = {(r.sp, r.moe): (r.sp_bitwise, r.status) for r in rows}
    assert status[(True, "ep")] == (False, "FAIL: SP on and off differ bitwise"), status
    assert status[(True, "tp")] == (True, "ok") and status[(False, "ep")] == (None, "ok"), status


def test_deterministic_megatron_attention_runs_documents_of_a_mask_and_refuses_other_masks():
    """The deterministic mode's attention reads the documents of Megatron's --reset-attention-mask (a
    causal block-diagonal mask, per column) and refuses, in one line, a mask that is not causal within
    documents of consecutive tokens."""
    from sp_core.models import ModelError
    from sp_core_megatron.batch import MegatronBatch

    s = 6
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])  # b = 2: documents 3 + 2 + 1, then one of 6
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    assert MegatronBatch.from_megatron(s, 2, "cpu", ~allowed.unsqueeze(1)).sequence_lengths == [3, 2, 1, 6]
    assert MegatronBatch.from_megatron(s, 2, "cpu").sequence_lengths == [6, 6]
    sliding = torch.ones(s, s, dtype=torch.bool).tril() & ~torch.ones(s, s, dtype=torch.bool).tril(-3)  # a window
    with pytest.raises(ModelError, match="column 0 of this attention_mask is not"):
        MegatronBatch.from_megatron(s, 1, "cpu", ~sliding.view(1, 1, s, s)).sequence_lengths


def test_deterministic_megatron_sparse_attention_equals_the_default_forms_values_and_gradients():
    """DeepSeek-V3.2's selection in the deterministic mode (the core's kernel per column, the selection as
    rows of that layout) gives the default mode's masked attention over the [s, b] grid, forward and input
    gradients, within float32 tolerance: b = 2, SP padding rows, rows selecting fewer than k keys."""
    from sp_core_megatron.batch import MegatronBatch, megatron_attention

    s, b, heads, k, padding = 7, 2, 2, 3, 2
    g = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(s * b + padding, heads, 5, generator=g) for _ in range(3))
    selection = torch.full((s * b + padding, k), -1, dtype=torch.int32)
    for row in range(s * b):  # s-major row = position * b + column: up to k of the column's earlier keys
        position, column = divmod(row, b)
        chosen = torch.randperm(position + 1, generator=g)[:min(k, position + 1 - (position == 4))]
        selection[row, : chosen.shape[0]] = (chosen * b + column).to(torch.int32)
    outs, grads = [], []
    for deterministic in (False, True):
        inputs = [x.clone().requires_grad_() for x in (q, key, v)]
        out = megatron_attention(*inputs, MegatronBatch(s, b, deterministic=deterministic), scale=0.3,
                                 topk_indices=selection)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([x.grad for x in inputs])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    dense = megatron_attention(q, key, v, MegatronBatch(s, b, deterministic=True), scale=0.3)
    assert (dense - outs[1])[: s * b].abs().max() > 1e-2  # control: the selection changes the attention


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the one-launch batch-invariant GEMM needs a GPU"))])
def test_index_scores_do_not_depend_on_how_many_rows_and_keys_are_scored_together(device):
    """DeepSeek-V3.2's index scores in the deterministic mode: a query row's score of a key is the same
    whatever other rows and keys the call holds (sglang scores a request's rows against its cached keys,
    Megatron a rank's rows against the micro-batch's); torch's einsum form is not (the negative control).
    On a GPU the q.k products go through the one-launch batch-invariant GEMM (Triton)."""
    g = torch.Generator().manual_seed(0)
    q, weights, keys = (t.to(device) for t in (torch.randn(40, 8, 16, generator=g), torch.randn(40, 8, generator=g),
                                                torch.randn(40, 16, generator=g)))

    def einsum_form(q, w, k):
        return torch.einsum("sh,sht->st", w, F.relu(torch.einsum("shd,td->sht", q, k) * 0.25))

    shapes = [(r, n) for r in (1, 2, 3, 5, 7, 13, 20) for n in (1, 3, 7, 13, 21, 40)]
    full = einsum_form(q, weights, keys)
    einsum_varies = any(not torch.equal(einsum_form(q[:r], weights[:r], keys[:n]), full[:r, :n]) for r, n in shapes)
    assert device != "cpu" or einsum_varies, "negative control: torch's einsum came out shape-invariant here"
    invariant = batch_invariant.index_scores(q, weights, keys, 0.25)
    for r, n in shapes:
        assert torch.equal(batch_invariant.index_scores(q[:r], weights[:r], keys[:n], 0.25), invariant[:r, :n]), (r, n)
        assert torch.equal(batch_invariant.index_scores(q[r:], weights[r:], keys[n - 1:], 0.25),
                           invariant[r:, n - 1:]), (r, n)  # keys at other columns of their blocks
    torch.testing.assert_close(invariant, full, rtol=1e-5, atol=1e-5)
