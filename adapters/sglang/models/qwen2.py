from sp_core_sglang.models.causal_lm import SPCoreForCausalLM


class Qwen2ForCausalLM(SPCoreForCausalLM):
    pass


EntryClass = Qwen2ForCausalLM
