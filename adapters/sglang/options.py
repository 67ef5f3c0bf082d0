"""sglang server-argument resolution for the adapter's DeepSeek models (in the launching process, before any
worker starts -- a worker's error would kill the launcher instead):

- refusal of the sglang options they do not support: one line naming the option;
- V3.2 on sglang's ordinary MLA path. sglang 0.5.23 treats every checkpoint whose architecture is in its DSA
  list and whose config has ``index_topk`` as DSA (``configs/model_config.py::is_deepseek_dsa``): it then
  forces the ``dsa`` attention backend unless one is given, page size 64, GPU-only resolution steps
  (the CUDA device-capability query in ``model_hook.py``: on CPU every V3.2 launch fails there) and
  its ``DSATokenToKVPool`` (fp8 index keys, index_head_dim 128). The adapter serves V3.2's indexer and
  sparse attention itself (index keys cached per KV slot, ``index_keys.py``), so it hides ``index_topk``
  from that detection through sglang's own ``--json-model-override-args``: ``index_topk`` is set to null
  and its value kept as ``sp_core_index_topk``, which the adapter's model config reads back. Upstream's
  DSA path is then never entered; nothing is served dense (the model refuses a config without the value).
- FP8 checkpoints (config.json ``quantization_config`` with ``quant_method: fp8``), of every architecture the
  adapter serves, are dequantised at load by the adapter's loader (``sp_core.models.fp8``). sglang's own FP8
  path would build an ``Fp8Config`` (bf16 / fp16 only, its FP8 linear layers, on CPU block-aligned padding of
  the config): the ``quantization_config`` is hidden from sglang the same way (null, its value kept as
  ``sp_core_quantization_config``, which the adapter's model config reads back). Serving with sglang's FP8
  kernels through the adapter is a later step.
"""
from __future__ import annotations

import json

DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM")
HOOK_STEP = "handle_cuda_graph_config"  # an overridable step that runs for every launch
MODEL_STEP = "handle_model_source_paths"  # the step before the first reader of the model's config
HIDDEN_INDEX_TOPK = "sp_core_index_topk"  # index_topk, hidden from sglang's DSA detection
HIDDEN_QUANTIZATION = "sp_core_quantization_config"  # an FP8 quantization_config, hidden from sglang's FP8 path


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
    found = unsupported_options(server_args, hf_config)
    if found:
        flag, value, why = found[0]
        raise ValueError(f"sp_core's {architectures[0]} does not support {flag}={value} ({why}); "
                         f"unset it or serve without SP_CORE_SGLANG=1")


def _checkpoint_config(server_args):
    """(sglang's resolving view of the server arguments, the checkpoint's config.json as a dict, or None where
    it cannot be read: sglang's own steps report that)."""
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from transformers import PretrainedConfig

    view = resolving_view(server_args)
    try:
        return view, PretrainedConfig.get_config_dict(view.model_path, revision=view.revision)[0]
    except (OSError, ValueError):
        return view, None


def _declare(server_args, overrides: dict) -> None:
    from sglang.srt.arg_groups.overrides import declare_resolution

    declare_resolution(server_args, "sp_core_sglang.options", json_model_override_args=json.dumps(overrides))


def serve_dsa_through_the_adapter(server_args, previous) -> None:
    """A V3.2 checkpoint: ``index_topk`` moved out of sglang's DSA detection (see the module docstring)."""
    previous(server_args)
    view, hf = _checkpoint_config(server_args)
    if hf is None:
        return
    architectures = hf.get("architectures") or []
    if not architectures or architectures[0] != "DeepseekV32ForCausalLM" or hf.get("index_topk") is None:
        return
    overrides = json.loads(view.json_model_override_args or "{}")
    if HIDDEN_INDEX_TOPK in overrides:  # resolved before
        return
    if overrides.get("index_topk", hf["index_topk"]) is None:
        raise ValueError("sp_core's DeepseekV32ForCausalLM needs index_topk; do not override it to null")
    overrides[HIDDEN_INDEX_TOPK] = overrides.pop("index_topk", hf["index_topk"])
    overrides["index_topk"] = None
    _declare(server_args, overrides)


def serve_fp8_through_the_adapter(server_args, previous) -> None:
    """An FP8 checkpoint of an architecture the adapter serves: ``quantization_config`` moved out of sglang's
    sight (see the module docstring); any other quantisation is left to sglang's checks and the model's refusal."""
    previous(server_args)
    from sp_core.models.config import SUPPORTED_ARCHITECTURES

    view, hf = _checkpoint_config(server_args)
    if hf is None:
        return
    quant = hf.get("quantization_config")
    architectures = hf.get("architectures") or []
    if (not architectures or architectures[0] not in SUPPORTED_ARCHITECTURES or not isinstance(quant, dict)
            or quant.get("quant_method") != "fp8"):
        return
    overrides = json.loads(view.json_model_override_args or "{}")
    if HIDDEN_QUANTIZATION in overrides:  # resolved before
        return
    overrides[HIDDEN_QUANTIZATION] = overrides.pop("quantization_config", quant)
    overrides["quantization_config"] = None
    _declare(server_args, overrides)


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

        register_resolution_hook(MODEL_STEP)(serve_dsa_through_the_adapter)
        register_resolution_hook(MODEL_STEP)(serve_fp8_through_the_adapter)
        register_resolution_hook(HOOK_STEP)(check_deepseek_options)
        _registered = True
