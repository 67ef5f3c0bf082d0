"""Start-up refusal of sglang options the adapter's DeepSeek models do not support: one line naming the
option, raised while sglang resolves its server arguments (in the launching process, before any worker
starts -- a worker's error would kill the launcher instead)."""
from __future__ import annotations

DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM")
HOOK_STEP = "handle_cuda_graph_config"  # an overridable step that runs for every launch


def unsupported_options(server_args, hf_config) -> list:
    """The ``(flag, value, why)`` of each option set that sp_core's DeepSeek models cannot serve."""
    found = []
    if getattr(server_args, "quantization", None):
        found.append(("--quantization", server_args.quantization, "quantised checkpoints are not served"))
    quant_config = getattr(hf_config, "quantization_config", None)
    if quant_config:
        method = quant_config.get("quant_method") if isinstance(quant_config, dict) else quant_config
        found.append(("config.json quantization_config", method, "quantised checkpoints are not served"))
    a2a = getattr(server_args, "moe_a2a_backend", "none")
    if a2a not in (None, "none"):
        found.append(("--moe-a2a-backend", a2a, "MoE runs in the core's TP or EP-all-gather mode"))
    spec = getattr(server_args, "speculative_algorithm", None)
    if spec:
        found.append(("--speculative-algorithm", spec, "no MTP / draft layers in the core"))
    kv_dtype = getattr(server_args, "kv_cache_dtype", "auto")
    if kv_dtype not in (None, "auto"):
        found.append(("--kv-cache-dtype", kv_dtype, "the latent cache is kept in the model dtype"))
    return found


def check_deepseek_options(server_args, previous) -> None:
    previous(server_args)
    from sglang.srt.arg_groups.model_override_base import model_config_of

    hf_config = model_config_of(server_args).hf_config
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures or architectures[0] not in DEEPSEEK_ARCHITECTURES:
        return
    if architectures[0] == "DeepseekV32ForCausalLM":
        raise ValueError("sp_core's sglang adapter does not serve DeepseekV32ForCausalLM yet (V3.2's sparse "
                         "attention over cached indexer keys is not built); serve it without SP_CORE_SGLANG=1")
    found = unsupported_options(server_args, hf_config)
    if found:
        flag, value, why = found[0]
        raise ValueError(f"sp_core's {architectures[0]} does not support {flag}={value} ({why}); "
                         f"unset it or serve without SP_CORE_SGLANG=1")


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

        register_resolution_hook(HOOK_STEP)(check_deepseek_options)
        _registered = True
