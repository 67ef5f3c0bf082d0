from sp_core.models.causal_lm import CausalLM
from sp_core.models.checkpoint import load_hf_checkpoint, load_weights, save_hf_checkpoint
from sp_core.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelError, NonFiniteError
