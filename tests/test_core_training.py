"""The core's training step where users go: fewer KV heads than t, torch.autocast, no host sync."""
import pytest
import torch

from sp_core import mpu
from sp_core.mpu import platform
from sp_core.app.runtime import load_model, pack
from support.checkpoints import make_checkpoint
from support.compare import rel
from support.host_sync import count_host_syncs
from support.multirank import run_ranks
from test_qwen_core import RAGGED, _gradients


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(name, str(root / name)) for name in ("qwen2", "qwen3")}


# qwen3 at t = 2: one KV head on both ranks (no SP; with SP: test_megatron_paths.py, packed and GPTModel);
# qwen2 at t = 4 with SP: two KV heads, each on two ranks
@pytest.mark.parametrize("name,tp,sp", [("qwen3", 2, False), ("qwen2", 4, True)])
def test_gradients_with_fewer_kv_heads_than_tp_equal_tp1(checkpoints, name, tp, sp):
    d = checkpoints[name]
    base = run_ranks(1, _gradients, d)[0]
    got = run_ranks(tp, _gradients, d, sequence_parallel=sp)[0]
    for key in base:
        assert rel(got[key], base[key]) <= 1e-5, f"{name} tp={tp} SP={sp}: gradient of {key}"


def _autocast_loss_and_grads(model_dir):
    model = load_model(model_dir).train()
    ids, positions, batch = pack(RAGGED, platform.current_device())
    with torch.autocast(platform.device_type(), dtype=torch.bfloat16):
        loss = model.loss(ids, positions, batch, torch.roll(ids, -1)).sum()
    loss.backward()
    mpu.allreduce_sequence_parallel_grads(model.parameters())
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def test_autocast_bfloat16_sp_equals_no_sp(checkpoints):
    """The column layer's backward runs under the forward's autocast state (custom_fwd / custom_bwd)."""
    on = run_ranks(2, _autocast_loss_and_grads, checkpoints["qwen3"], sequence_parallel=True)[0]
    off = run_ranks(2, _autocast_loss_and_grads, checkpoints["qwen3"], sequence_parallel=False)[0]
    assert abs(on[0] - off[0]) <= 1e-2 * abs(off[0])
    for name, grad in off[1].items():
        assert ((on[1][name] - grad).norm() / grad.norm()).item() <= 2e-2, name


def _syncs_in_training_step(model_dir):
    model = load_model(model_dir).train()
    ids, positions, batch = pack(RAGGED, platform.current_device())
    labels = torch.roll(ids, -1)
    with count_host_syncs() as syncs:
        model.loss(ids, positions, batch, labels).sum().backward()
    bad = labels.clone()
    bad[0] = 10_000
    with count_host_syncs() as control:  # negative control: the counter sees a sync when there is one
        (labels.max() < 10_000).item()
    try:
        model.loss(ids, positions, batch, bad)
        error = None
    except (RuntimeError, ValueError) as err:
        error = str(err)
    return dict(syncs), dict(control), error


def test_training_step_has_no_host_sync(checkpoints):
    syncs, control, error = run_ranks(2, _syncs_in_training_step, checkpoints["qwen2"])[0]
    assert control, "the sync counter missed .item()"
    assert not syncs, f"forward + backward waited on the device: {syncs}"
    assert error is not None and "labels must lie in [0, 97)" in error and "\n" not in error
