from sp_core_sglang.models.causal_lm import SPCoreForCausalLM


class Qwen2MoeForCausalLM(SPCoreForCausalLM):
    pass


EntryClass = Qwen2MoeForCausalLM
