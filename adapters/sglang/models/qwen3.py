from sp_core_sglang.models.causal_lm import SPCoreForCausalLM


class Qwen3ForCausalLM(SPCoreForCausalLM):
    pass


EntryClass = Qwen3ForCausalLM
