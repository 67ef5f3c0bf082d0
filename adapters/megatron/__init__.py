"""sp-core's Megatron adapter: train the core's TP-SP layers inside megatron-core.
``cli_engine/`` is the ``sp-core`` command's megatron engine and its CPU test bed, apart from the adapter."""
from sp_core_megatron.config import SPCoreTransformerConfig, extra_args_provider, transformer_config_from_hf
from sp_core_megatron.export import export_hf_checkpoint
from sp_core_megatron.hf_weights import gpt_model_args, load_hf_into_gpt_model
from sp_core_megatron.model import SPCoreGPTModel
from sp_core_megatron.provider import build_model, get_sp_core_model_spec, make_model_provider
from sp_core_megatron.layer_spec import SPCoreTransformerLayer, deterministic_gpt_model, get_sp_core_block_spec
