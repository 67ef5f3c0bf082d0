from sp_core_sglang.models.causal_lm import SPCoreForCausalLM


class Qwen3MoeForCausalLM(SPCoreForCausalLM):
    pass


EntryClass = Qwen3MoeForCausalLM
