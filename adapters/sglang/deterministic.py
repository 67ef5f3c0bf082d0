"""sglang's ``--enable-deterministic-inference`` with sp_core's models (registered by the plugin).

The flag turns on the core's deterministic mode in every worker (``models/causal_lm.py``): invariant
collectives, batch-invariant GEMMs and, in prefill, the core's attention kernel over sglang's KV cache
(``attention.py``). Two things sglang needs told:
- its allowlist of deterministic attention backends: ``torch_native`` (the CPU backend) joins it through
  sglang's own extension point, since prefill attention is then the core's kernel;
- on CPU, sglang's batch-invariant aten kernels are Triton GPU kernels and its start-up call to install
  them raises ("No supported accelerator"); there the core's blocked GEMMs stand in, so the call is
  skipped on CPU only (a patch of ``ModelRunner.maybe_enable_batch_invariant_mode``; on GPUs sglang's
  own kernels are installed as usual).
"""
from __future__ import annotations

import functools

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import DETERMINISTIC_ATTENTION_BACKEND_CHOICES
    from sglang.srt.model_executor.model_runner import ModelRunner

    if "torch_native" not in DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        from sglang.srt.server_args import add_deterministic_attention_backend_choices

        add_deterministic_attention_backend_choices(["torch_native"])
    install = ModelRunner.maybe_enable_batch_invariant_mode

    @functools.wraps(install)
    def maybe_enable_batch_invariant_mode(runner):
        if str(runner.device) != "cpu":
            install(runner)

    ModelRunner.maybe_enable_batch_invariant_mode = maybe_enable_batch_invariant_mode
    _registered = True
