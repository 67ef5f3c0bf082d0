"""t = 8 (our users' TP): the same equivalence checks with 8 ranks (gloo on CPU, NCCL on an 8-GPU machine)."""
import pytest

from sp_core.app.tiny import PROMPTS, make_checkpoint, reference_logprobs
from support.compare import max_diff, rel
from support.multirank import run_ranks
from support.contexts import remake
from test_qwen_core import _gradients


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp8")
    return {name: make_checkpoint(name, str(root / name)) for name in ("qwen3-tp8", "qwen2-tp8-train")}


def _logprobs(model_dir):
    from sp_core import mpu
    from sp_core.app.runtime import load_model, prompt_logprobs

    out = {}
    for sp in (False, True):
        remake(sequence_parallel=sp)
        out[sp] = prompt_logprobs(load_model(model_dir), PROMPTS)
    return out


def test_logprobs_at_tp8(ckpts):
    got = run_ranks(8, _logprobs, ckpts["qwen3-tp8"])[0]
    ref = reference_logprobs(ckpts["qwen3-tp8"], PROMPTS)
    assert max_diff(got[True], ref) <= 1e-4 and max_diff(got[False], ref) <= 1e-4
    assert max_diff(got[True], got[False]) <= 1e-5


def test_gradients_at_tp8_equal_tp1(ckpts):
    d = ckpts["qwen2-tp8-train"]
    base = run_ranks(1, _gradients, d)[0]
    got = run_ranks(8, _gradients, d)[0]
    for key in base:
        assert rel(got[key], base[key]) <= 1e-5, f"tp=8 SP: gradient of {key}"


def test_megatron_training_at_tp8_equals_tp1(ckpts):
    from sp_core_megatron.cli_engine import engine

    d = ckpts["qwen2-tp8-train"]
    base = engine.train_steps(d, 1, False, 3, capture_grads=True)
    got = engine.train_steps(d, 8, True, 3, capture_grads=True)
    assert max(abs(a - b) for a, b in zip(got["losses"], base["losses"])) <= 1e-5
    for key, grad in base["grads0"].items():
        assert rel(got["grads0"][key], grad) <= 1e-5, key


DEEPSEEK_TP8 = ("deepseek-v3-tp8", "deepseek-v32-tp8")
MOE_MODES = ("tp", "ep")  # TP-sharded experts; expert parallelism (one whole expert per rank at t = 8)


@pytest.fixture(scope="module")
def deepseek_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek-tp8")
    return {name: make_checkpoint(name, str(root / name)) for name in DEEPSEEK_TP8}


def _deepseek_rank(dirs):
    """Log-probabilities (SP on / off, T = 11 and T = 1 < t) and SP-on gradients of every parameter,
    for each model and MoE mode."""
    from sp_core import mpu
    from sp_core.app.runtime import load_model, prompt_logprobs
    from support.gradients import core_lm_gradients

    out = {}
    for name, d in dirs.items():
        for mode in MOE_MODES:
            for sp in ((False, True) if mpu.default_context().size > 1 else (False,)):
                remake(sequence_parallel=sp)
                model = load_model(d, moe_parallel=mode)
                out[name, mode, sp, "logprobs"] = [prompt_logprobs(model, PROMPTS), prompt_logprobs(model, [[11]])]
            out[name, mode, "grads"] = core_lm_gradients(model, PROMPTS)
    return out


def test_deepseek_at_tp8(deepseek_ckpts):
    """V3 and V3.2 at t = 8, MoE in both modes: log-probabilities equal transformers' (SP on and off, and
    T = 1 < t), gradients of every parameter equal t = 1's."""
    base = run_ranks(1, _deepseek_rank, deepseek_ckpts)[0]
    got = run_ranks(8, _deepseek_rank, deepseek_ckpts)[0]
    for name, d in deepseek_ckpts.items():
        ref = [reference_logprobs(d, PROMPTS), reference_logprobs(d, [[11]])]
        for mode in MOE_MODES:
            for sp in (False, True):
                for lp, want in zip(got[name, mode, sp, "logprobs"], ref):
                    assert max_diff(lp, want) <= 1e-4, f"{name} {mode} SP={sp}"
            grads, want = got[name, mode, "grads"], base[name, mode, "grads"]
            assert grads.keys() == want.keys()
            for key in want:
                assert rel(grads[key], want[key]) <= 1e-5, f"{name} {mode}: gradient of {key}"
