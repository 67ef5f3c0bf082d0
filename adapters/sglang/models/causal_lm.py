"""The core's CausalLM as a sglang model: sglang's TP group, attention backend, KV cache and logits.

Built inside each TP worker by sglang's model loader (``cls(config=hf_config, quant_config=...)``).
Sequence parallelism follows sglang's ``--enable-layernorm-sp``: on for plain prefill batches
(``ForwardMode.EXTEND``, as upstream's ``layernorm_sp.runs_sp``) of at least ``SP_CORE_SP_MIN_TOKENS``
tokens; every other mode (decode, MIXED chunked prefill + decode, TARGET_VERIFY, SPLIT_PREFILL, ...) runs
plain TP. Collectives go through sglang's TP ``GroupCoordinator`` (bound into ``sp_core.mpu``).
sglang's ``--enable-deterministic-inference`` turns on the core's deterministic mode (invariant collectives,
batch-invariant GEMMs -- sglang's logits processor included -- and the core's attention in prefill).
"""
from __future__ import annotations

from typing import Optional

import torch

from sp_core import mpu
from sp_core.kernels import batch_invariant
from sp_core.layers.attention import head_split
from sp_core.models import CausalLM, ModelConfig, ModelError, checkpoint
from sp_core.mpu import crossover
from sp_core_sglang.attention import RadixAttentionKernel, SglangBatch
from sp_core_sglang.options import HIDDEN_INDEX_TOPK, HIDDEN_QUANTIZATION

SP_MIN_TOKENS_ENV = "SP_CORE_SP_MIN_TOKENS"
# Below the threshold a prefill batch runs plain TP: for small batches reduce-scatter + all-gather lose to
# one all-reduce (vLLM's SP pass keeps such a threshold). Its default is the crossover measured for the
# model family at this tp size on this platform (sp_core.mpu.crossover, docs/benchmarks.md); where none
# was measured (another platform or tp size), this fallback: the first-round H100 / H200 crossover.
DEFAULT_SP_MIN_TOKENS = 8192


# On CPU, sglang pads head counts and intermediate sizes to multiples of the tp size for its own layers
# (configs/update_config.py::adjust_config_with_unaligned_cpu_tp) and keeps the checkpoint's values as
# original_*; the core shards the checkpoint's own shapes.
_SGLANG_CPU_PADDED = {"num_attention_heads": "original_num_attention_heads",
                      "num_key_value_heads": "original_total_num_kv_heads",
                      "intermediate_size": "original_intermediate_size",
                      "moe_intermediate_size": "original_moe_intermediate_size",
                      "shared_expert_intermediate_size": "original_shared_expert_intermediate_size"}


def checkpoint_config(hf_config, moe_parallel: str = "tp") -> ModelConfig:
    hf = hf_config.to_dict()
    for name, original in _SGLANG_CPU_PADDED.items():
        if hf.get(original) is not None:
            hf[name] = hf.pop(original)
    if hf.get(HIDDEN_INDEX_TOPK) is not None:  # V3.2: kept away from sglang's DSA path (options.py)
        hf["index_topk"] = hf.pop(HIDDEN_INDEX_TOPK)
    if hf.get(HIDDEN_QUANTIZATION) is not None:  # an FP8 checkpoint, kept away from sglang's FP8 path (options.py)
        hf["quantization_config"] = hf.pop(HIDDEN_QUANTIZATION)
    return ModelConfig.from_dict(hf, moe_parallel)


def moe_parallel_of(parallel) -> str:
    """The core's MoE mode from sglang's ``--ep-size``: 1 -> experts TP-sharded ("tp"); the whole TP group ->
    expert parallelism ("ep", n_routed_experts / t whole experts per rank, as sglang's EP without an a2a
    backend). sglang itself requires ep_size * moe_dp_size == tp_size."""
    ep, tp = getattr(parallel, "moe_ep_size", 1), getattr(parallel, "tp_size", 1)
    if ep <= 1:
        return "tp"
    if ep != tp:
        raise ModelError(f"sp_core's MoE runs expert parallelism over the whole TP group: --ep-size {ep} must be 1 "
                         f"or the tp size {tp} (no --moe-dp-size)")
    return "ep"


def sp_min_tokens(cfg: ModelConfig, t: int, setting: Optional[str] = None) -> int:
    """``setting`` (``SP_CORE_SP_MIN_TOKENS``, from the model's ``Settings``) if given, else the measured
    crossover for ``cfg``'s family at tp size ``t``."""
    raw = setting
    if not raw:
        measured = crossover.sp_prefill_min_tokens(t, crossover.family(cfg))
        return DEFAULT_SP_MIN_TOKENS if measured is None else measured
    if not raw.isdigit():
        raise ModelError(f"{SP_MIN_TOKENS_ENV}={raw!r}: expected a non-negative integer (a token count)")
    return int(raw)


def sequence_parallel_for(forward_mode, num_tokens: int, min_tokens: int) -> bool:
    """SP for a forward of ``num_tokens`` tokens (a shape, not a device value) in ``forward_mode``: only
    plain prefill (``ForwardMode.EXTEND``, as upstream's ``layernorm_sp.runs_sp``) at or above the
    threshold. Reading no device value, it costs no host sync and gives the same answer on every replay
    of a captured CUDA graph (sglang captures DECODE and TARGET_VERIFY, which run plain TP).

    sglang 0.5.23's eager runner relabels a MIXED batch (prefill chunk + 1-token decode tails) EXTEND
    before the model sees it, except on NPU or under context parallelism; it then runs SP, exactly."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return forward_mode == ForwardMode.EXTEND and num_tokens >= min_tokens


def _check_parallelism(parallel, quant_config) -> None:
    if quant_config is not None:
        raise ModelError(f"sp_core's sglang models serve unquantised checkpoints only; got {quant_config.get_name()}")
    for name, what in (("pp_size", "pipeline parallelism"), ("attn_dp_size", "attention data parallelism"),
                       ("attn_cp_size", "attention context parallelism")):
        if getattr(parallel, name, 1) > 1:
            raise ModelError(f"sp_core's sglang models support tensor parallelism only, not {what} ({name} > 1)")


def _radix_kernel(cfg: ModelConfig, layer_id: int, prefix: str) -> RadixAttentionKernel:
    from sglang.srt.layers.radix_attention import RadixAttention

    q, k, _ = head_split(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, mpu.context_for().size)
    d = cfg.head_dim
    return RadixAttentionKernel(RadixAttention(q.local // d, d, d ** -0.5, num_kv_heads=k.local // d, layer_id=layer_id,
                                               prefix=f"{prefix}model.layers.{layer_id}.self_attn.attn"))


class SPCoreForCausalLM(CausalLM):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        from sglang.srt.distributed import get_tp_group
        from sglang.srt.layers.logits_processor import LogitsProcessor
        from sglang.srt.runtime_context import get_exec, get_parallel

        server = get_parallel()
        _check_parallelism(server, quant_config)
        tp_group = get_tp_group()
        parallel = mpu.bind(tp_group.device_group, communicator=tp_group,
                            deterministic=get_exec().deterministic.enable_deterministic_inference)
        cfg = checkpoint_config(config, moe_parallel_of(server))
        super().__init__(cfg, attention_kernel=self._attention_kernels(cfg, prefix), parallel=parallel)  # sglang's dtype
        self.logits_processor = LogitsProcessor(config)
        # allowed: started with --enable-layernorm-sp; enabled: the run-time switch (control.py), on by default
        self.sequence_parallel_allowed = self.sequence_parallel_enabled = bool(server.enable_layernorm_sp)
        self.sp_min_tokens = sp_min_tokens(cfg, parallel.size, parallel.settings.sp_min_tokens)

    @staticmethod
    def _attention_kernels(cfg: ModelConfig, prefix: str):
        """Layer index -> that layer's attention kernel: a ``RadixAttention`` (sglang's backend and KV pool)."""
        return lambda layer_id: _radix_kernel(cfg, layer_id, prefix)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def runs_sequence_parallel(self, forward_batch, num_tokens: int) -> bool:
        return self.sequence_parallel_enabled and sequence_parallel_for(forward_batch.forward_mode, num_tokens,
                                                                         self.sp_min_tokens)

    @torch.no_grad()
    @batch_invariant.when_deterministic
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch,
                input_embeds=None, get_embedding: bool = False, **unused):
        if input_embeds is not None or get_embedding:
            raise ModelError("sp_core's sglang models take token ids and return logits "
                             "(no input embeddings, no embedding mode)")
        num_tokens = input_ids.shape[0]
        if num_tokens == 0:  # an idle batch
            hidden = self.lm_head.weight.new_empty((0, self.config.hidden_size))
        else:
            with self.parallel.sequence_parallel_for(self.runs_sequence_parallel(forward_batch, num_tokens)):
                hidden = self.hidden_states(input_ids, positions, SglangBatch(forward_batch, num_tokens))
                hidden = mpu.exit_sequence_parallel(hidden, num_tokens, self.parallel)
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch)

    def load_weights(self, weights) -> None:
        """``weights``: (Hugging Face name, full tensor) pairs; each rank keeps its slice. An FP8 checkpoint's
        weights are joined to their scales and dequantised to the model's dtype, each rank its own slice
        (``checkpoint.load_weights``); sglang's own FP8 kernels are not used. A refit's commit
        (``update_weights_from_tensor`` from ``sp_core_sglang.refit``) loads the refit it staged."""
        from sp_core_sglang import refit

        refit.load_weights(self, weights, checkpoint.load_weights)
