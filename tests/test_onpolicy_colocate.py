"""`sp-core onpolicy` as a command, in the one run that needs an engine of its own: the tiny DeepSeek-V3 trained with
TP-sharded experts (--moe-parallel tp) refits an engine holding whole experts per rank (--server-moe-parallel ep:
the reshard path at every refit), colocated (--colocate: the engine's memory released while Megatron trains; on CPU
the resumed weights are overwritten with NaN before each refit, so only what the refit writes is served).

The reference is Megatron's own log-probabilities of the sampled tokens, every iteration (another framework,
another MoE layout: within 1e-5). The control that the NaN overwrite bites (served NaN without the refit) is in
tests/test_refit.py, on its engine."""
import importlib.util
import json

import pytest

from sp_core.app.cli import main
from sp_core.app.tiny import make_checkpoint

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None or importlib.util.find_spec("megatron") is None,
                       reason="sglang and megatron-core are needed"),
    pytest.mark.timeout(600),
]


def test_onpolicy_trainer_tp_experts_refits_a_colocated_ep_engine(tmp_path, monkeypatch, capsys):
    from sp_core_megatron.cli_engine import engine as megatron
    from sp_core_sglang.cli_engine import engine as sglang

    calls = {}

    def spy(module, name):
        real = getattr(module, name)

        def record(*args, **kwargs):
            calls[name] = (args, kwargs)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, record)

    spy(sglang, "start_for_refit")
    spy(megatron, "onpolicy")
    model_dir = make_checkpoint("deepseek-v3", str(tmp_path / "deepseek-v3"))
    report = tmp_path / "onpolicy.json"
    code = main(["onpolicy", "--model", model_dir, "--tp", "2", "--sequence-parallel", "--deterministic",
                 "--moe-parallel", "tp", "--server-moe-parallel", "ep", "--colocate", "--steps", "1",
                 "--json", str(report)])
    err = capsys.readouterr().err
    assert code == 0, err
    # the engine in ep (sglang's --ep-size), the trainer in tp, the loop colocated
    assert calls["start_for_refit"][0][:4] == (model_dir, 2, True, "ep")
    assert "enable_memory_saver" not in calls["start_for_refit"][1]  # CPU: torch_memory_saver is CUDA-only
    assert calls["onpolicy"][0][4] == "tp" and calls["onpolicy"][0][11] is True
    assert "MoE tp, server MoE ep" in err and "colocated" in err
    assert "--colocate on CPU: sglang's release keeps the weights here" in err
    run = json.loads(report.read_text())
    assert (run["moe_parallel"], run["server_moe_parallel"], run["colocate"], run["stopped"]) == ("tp", "ep", True, "")
    assert run["passed"] and len(run["rows"]) == 1
    for row in run["rows"] + [run["after_last_refit"]]:
        assert row["max_abs_delta"] <= 1e-5, row
    assert all(r["version_advanced"] and r["full_tensors"] == 0 for r in run["rows"]), run["rows"]
    assert run["after_last_refit"]["weight_version"] == "1"
