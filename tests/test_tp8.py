"""t = 8 (our users' TP): the same equivalence checks with 8 ranks (gloo on CPU, NCCL on an 8-GPU machine)."""
import pytest

from sp_core.tiny import PROMPTS, make_checkpoint, reference_logprobs
from support.multirank import run_ranks
from test_qwen_core import _gradients, _max_diff, _rel


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp8")
    return {name: make_checkpoint(name, str(root / name)) for name in ("qwen3-tp8", "qwen2-tp8-train")}


def _logprobs(model_dir):
    from sp_core import mpu
    from sp_core.runtime import load_model, prompt_logprobs

    out = {}
    for sp in (False, True):
        mpu.set_sequence_parallel(sp)
        out[sp] = prompt_logprobs(load_model(model_dir), PROMPTS)
    return out


def test_logprobs_at_tp8(ckpts):
    got = run_ranks(8, _logprobs, ckpts["qwen3-tp8"])[0]
    ref = reference_logprobs(ckpts["qwen3-tp8"], PROMPTS)
    assert _max_diff(got[True], ref) <= 1e-4 and _max_diff(got[False], ref) <= 1e-4
    assert _max_diff(got[True], got[False]) <= 1e-5


def test_gradients_at_tp8_equal_tp1(ckpts):
    d = ckpts["qwen2-tp8-train"]
    base = run_ranks(1, _gradients, d)[0]
    got = run_ranks(8, _gradients, d)[0]
    for key in base:
        assert _rel(got[key], base[key]) <= 1e-5, f"tp=8 SP: gradient of {key}"


def test_megatron_training_at_tp8_equals_tp1(ckpts):
    from sp_core_megatron import engine

    d = ckpts["qwen2-tp8-train"]
    base = engine.train_steps(d, 1, False, 3, capture_grads=True)
    got = engine.train_steps(d, 8, True, 3, capture_grads=True)
    assert max(abs(a - b) for a, b in zip(got["losses"], base["losses"])) <= 1e-5
    for key, grad in base["grads0"].items():
        assert _rel(got["grads0"][key], grad) <= 1e-5, key
