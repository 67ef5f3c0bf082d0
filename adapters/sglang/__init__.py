"""sp_core's sglang adapter: a sglang plugin (opt-in with SP_CORE_SGLANG=1) whose model classes run the
core's decoder layers, with sglang's attention backend and KV cache, TP group and --enable-layernorm-sp.
``cli_engine/`` is the ``sp-core`` command's sglang engine and its CPU test bed, apart from the adapter."""
