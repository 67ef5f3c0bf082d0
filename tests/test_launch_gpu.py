"""Ranks of ``sp_core.procs.launch.run_ranks`` use their GPU when the fork server has preloaded megatron-core
(tests/conftest.py preloads it, as the Megatron engine does): megatron-core's import asks
``torch.cuda.is_available()``, which must not initialise CUDA in the fork server. GPU only."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_gpu() -> float:
    import megatron.core.parallel_state  # noqa: F401  (what the fork server preloads, imported here too)

    import torch.distributed as dist

    x = torch.ones(4, device="cuda")
    dist.all_reduce(x)
    return float(x.sum())


def test_ranks_forked_after_megatron_preload_use_the_gpu():
    from sp_core.procs import launch

    launch.add_preload("megatron.core.parallel_state")
    assert launch.run_ranks(1, _on_gpu, timeout=300) == [4.0]
