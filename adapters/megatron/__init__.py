"""sp-core's Megatron adapter: train the core's TP-SP layers inside megatron-core."""
from sp_core_megatron.config import SPCoreTransformerConfig, extra_args_provider, transformer_config_from_hf
from sp_core_megatron.model import SPCoreGPTModel
