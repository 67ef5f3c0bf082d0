"""sp_core's sglang adapter: a sglang plugin (opt-in with SP_CORE_SGLANG=1) whose model classes run the
core's decoder layers, with sglang's attention backend and KV cache, TP group and --enable-layernorm-sp."""
