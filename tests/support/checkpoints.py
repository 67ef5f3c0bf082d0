"""Tiny checkpoints for tests: the embedded presets of sp_core.tiny (made by transformers itself)."""
from sp_core.tiny import TINY, hf_config, make_checkpoint, reference_logprobs  # noqa: F401
