"""sglang's ``--enable-deterministic-inference`` with sp_core's models (registered by the plugin).

The flag turns on the core's deterministic mode in every worker (``models/causal_lm.py``): invariant
collectives, batch-invariant GEMMs and, in prefill, the core's attention kernel over sglang's KV cache
(``attention.py``). Two things sglang needs told:
- its allowlists of deterministic attention backends (with and without the radix cache): ``torch_native``
  (the CPU backend) joins both through sglang's own extension points, since prefill attention is then
  the core's kernel, which reads a request's cached prefix back from the KV cache;
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
    from sglang.srt.arg_groups import choices
    from sglang.srt.model_executor.model_runner import ModelRunner

    for allowed, extend in ((choices.DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
                             choices.add_deterministic_attention_backend_choices),
                            (choices.RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND,
                             choices.add_radix_supported_deterministic_attention_backend_choices)):
        if "torch_native" not in allowed:
            extend(["torch_native"])
    install = ModelRunner.maybe_enable_batch_invariant_mode

    @functools.wraps(install)
    def maybe_enable_batch_invariant_mode(runner):
        if str(runner.device) != "cpu":
            install(runner)

    ModelRunner.maybe_enable_batch_invariant_mode = maybe_enable_batch_invariant_mode
    _registered = True
