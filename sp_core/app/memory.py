"""Activation memory per decoder layer: the paper's formulas, and bytes saved for backward, measured."""
from __future__ import annotations

from typing import Dict

import torch

from sp_core.models import ModelConfig

BYTES_16BIT = 2


def report(cfg: ModelConfig, tp: int, tokens: int, sequence_parallel: bool, cp: int = 1) -> Dict:
    formula = deepseek_report if cfg.mla is not None else qwen_moe_report if cfg.moe is not None else gpt_report
    out = formula(cfg, tp, tokens, sequence_parallel)
    return with_context_parallel(out, cfg, tp, tokens, cp) if cp > 1 else out


def cp_gathered_values_per_token(cfg: ModelConfig, tp: int) -> int:
    """Values per token one layer's attention gathers over CP: MLA's ``[kv_lat | k_pe]`` (kv_lora + rope) plus
    V3.2's index key; for GQA this TP rank's K and V heads (one at least, when there are fewer than t)."""
    if cfg.mla is not None:
        return cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim + (cfg.indexer.index_head_dim if cfg.indexer else 0)
    return 2 * max(1, cfg.num_key_value_heads // tp) * cfg.head_dim


def with_context_parallel(out: Dict, cfg: ModelConfig, tp: int, tokens: int, cp: int) -> Dict:
    """The report at cp x tp: every per-rank activation term holds T/cp tokens' rows (the attention scores,
    [a/t, T/cp, T], too), so the layer's bytes are divided by cp; and each rank's CP gather per layer: the
    gathered state of all T tokens (``cp_gather_bytes_per_layer``, 16-bit), of which it receives (cp-1)/cp.
    The measured bytes (``--measure``) are lower still: the attention over the gathered state is recomputed
    in backward, so neither the gather nor what is computed from it is saved."""
    scaled = {k: (int(v / cp) if isinstance(v, int) and k.endswith(("_per_layer", "_selective", "_per_rank", "_all_layers")) else v)
              for k, v in out.items()}
    if "activation_bytes_per_layer_by_type" in out:
        scaled["activation_bytes_per_layer_by_type"] = {k: int(v / cp) for k, v in
                                                        out["activation_bytes_per_layer_by_type"].items()}
    width = cp_gathered_values_per_token(cfg, tp)
    scaled.update(cp=cp, formula=f"{out['formula']}; per rank divided by cp", cp_gathered_values_per_token=width,
                  cp_gather_bytes_per_layer=BYTES_16BIT * tokens * width)
    return scaled


def gpt_report(cfg: ModelConfig, tp: int, tokens: int, sequence_parallel: bool) -> Dict:
    """Korthikanti et al. 2022, Table 2: activation bytes per layer, 16-bit activations, with
    s*b = tokens (one sequence of ``tokens``), h = hidden, a = heads, t = tp.

    full:      s b h (10 + 24/t + 5 a s / (h t))            TP only
               s b h (34 + 5 a s / h) / t                    TP + SP
    selective: the attention-score term dropped (recomputed, or never stored by a fused attention
               kernel): s b h (10 + 24/t) and 34 s b h / t.
    The paper derives them for a GPT layer (MHA, 4h MLP); for GQA / SwiGLU they are an estimate.
    """
    sbh, a, h, s, t = tokens * cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_size, tokens, tp
    sp = sequence_parallel and t > 1
    if sp:
        full, selective = sbh * (34 + 5 * a * s / h) / t, 34 * sbh / t
        formula = "sbh/t * (34 + 5as/h)"
    else:
        full, selective = sbh * (10 + 24 / t + 5 * a * s / (h * t)), sbh * (10 + 24 / t)
        formula = "sbh * (10 + 24/t + 5as/(ht))"
    return {
        "model": cfg.architecture,
        "tp": t,
        "tokens": tokens,
        "sequence_parallel": sp,
        "formula": formula,
        "activation_bytes_per_layer": int(full),
        "activation_bytes_per_layer_selective": int(selective),
        "bytes_per_value": BYTES_16BIT,
        "hidden_size": h,
        "num_attention_heads": a,
    }


def deepseek_report(cfg: ModelConfig, tp: int, tokens: int, sequence_parallel: bool) -> Dict:
    """Per-layer activation bytes of a DeepSeek layer, counted the paper's way (16-bit values saved for
    backward, selective: attention scores not stored), T = tokens, t = tp, h = hidden, a = heads,
    L = r_q + r_kv + d_r = the MLA latent (q_lora + kv_lora + rope), d_qk = nope + rope, d_v = v head dim:

      MLA:       2h (norm input, down-projection input) + r_q + r_kv (latent-norm inputs) + L (the latent,
                 input of q_b_proj / kv_b_proj) + a (2 d_qk + 2 d_v) / t (q, k, v, attention output)
      dense MLP: 2h (norm input, gate_up input) + 4 I / t (gate, up, silu(gate), their product)
      MoE:       2h + k h (the rows sent to the k routed experts) + 4 (k I_e + I_s) / t (expert and shared
                 intermediates), k = experts per token, I_e = moe_intermediate_size, I_s = shared width

    With SP every per-token term is held for T/t tokens: the whole layer is divided by t (the latent is
    saved as the token shard and re-gathered in backward). Without SP the 2h, r_q + r_kv, L and k h
    terms cover all T tokens on every rank. Values per token x T x 2 bytes.

    V3.2's indexer runs without gradient and saves nothing; its selection, int32 [T, k] with
    k = index_topk, is held by every rank (the head-sharded attention needs every row's keys):
    ``index_selection_bytes_per_rank``, 4 T k, not divided by t (0 when T <= index_topk: no selection).
    """
    mla, t, h = cfg.mla, tp, cfg.hidden_size
    sp = sequence_parallel and t > 1
    a = cfg.num_attention_heads
    latent = mla.latent_width
    replicated = 2 * h + (mla.q_lora_rank or 0) + mla.kv_lora_rank + latent
    heads = a * (2 * mla.qk_head_dim + 2 * mla.v_head_dim) / t
    per_token = {"mla": (replicated / t if sp else replicated) + heads,
                 "dense_mlp": (2 * h / t if sp else 2 * h) + 4 * cfg.intermediate_size / t}
    if cfg.moe is not None:
        moe = cfg.moe
        k, shared = moe.num_experts_per_tok, moe.moe_intermediate_size * moe.n_shared_experts
        rows = 2 * h + k * h
        per_token["moe"] = (rows / t if sp else rows) + 4 * (k * moe.moe_intermediate_size + shared) / t
    layers = {"dense": per_token["mla"] + per_token["dense_mlp"]}
    if "moe" in per_token:
        layers["sparse"] = per_token["mla"] + per_token["moe"]
    formula = ("T/t (2h + r_q + r_kv + L) + T a (2 d_qk + 2 d_v)/t + MLP" if sp else
               "T (2h + r_q + r_kv + L) + T a (2 d_qk + 2 d_v)/t + MLP")
    return {
        "model": cfg.architecture,
        "tp": t,
        "tokens": tokens,
        "sequence_parallel": sp,
        "formula": formula + "; L = q_lora + kv_lora + rope (the MLA latent); see sp_core/app/memory.py",
        "latent_width": latent,
        "latent_bytes_per_token": latent * BYTES_16BIT,
        "activation_bytes_per_layer": int(BYTES_16BIT * tokens * layers.get("sparse", layers["dense"])),
        "activation_bytes_per_layer_by_type": {kind: int(BYTES_16BIT * tokens * v) for kind, v in layers.items()},
        "bytes_per_value": BYTES_16BIT,
        "hidden_size": h,
        "num_attention_heads": a,
        **({"index_selection_bytes_per_rank": 4 * tokens * cfg.indexer.index_topk
            if tokens > cfg.indexer.index_topk else 0} if cfg.indexer is not None else {}),
    }


def qwen_moe_report(cfg: ModelConfig, tp: int, tokens: int, sequence_parallel: bool) -> Dict:
    """Bytes one Qwen2-MoE / Qwen3-MoE decoder layer saves for backward per rank, bf16 activations, counted from
    what the core's layers save (``--measure`` measures the same tensors), not the paper's estimate. In 2-byte
    units per token (a float32 value counts 2, an int64 4), T = tokens, t = tp, s = t with SP (the token shard)
    else 1, h = hidden, a / g = query / KV heads (g_t = KV heads per rank, replicated when g < t), d = head_dim:

      norms (input, post-attention; each):  (2h float32 input + h normalised + 2 float32 rstd) / s
      attention:  h / s (qkv input) + 2a / t (float32 log-sum-exp) + 4 (positions) + 2 a d / t (attention output,
                  o_proj input) + with a KV head per query head on the rank (g_t = a/t): (a/t + 2 g_t) d (q, k, v)
                  + (a/t + g_t) d (roped q, k); with fewer (GQA: the core's attention kernel repeats k and v to the
                  query heads): 3 a d / t (roped q, repeated k and v); Qwen3's q/k norms add 3 (a/t + g_t) d
                  (float32 input, output) + 2 (a/t + g_t) (rstd); with KV heads replicated over the ranks
                  (g < t), the rank's qkv weight, assembled from its q slice and the KV heads: 2 h (a/t + 2 g_t) d
                  bytes a layer
      dense MLP (layers in mlp_only_layers, or that decoder_sparse_step skips):  h / s + 4 I / t
      MoE (the others; k = num_experts_per_tok, E = num_experts, I_e = moe_intermediate_size):
                  6 k I_e / t (gate_up, silu, product, the routing weight's float32 scaling) + 14 k (the k T
                  routed rows' int64 indices and float32 weight, on every rank) + (2h + 2E + 4k) / s (the
                  router's float32 input and probabilities, top-k ids) + k h with SP off (the routed rows) or
                  h / s with SP (the token shard, gathered again in backward); norm_topk_prob: (2k + 2) / s;
                  Qwen2-MoE's shared expert of width I_s: h / s (its input, without SP) + 5 I_s / t + 1 + 1/t
                  with SP (its sigmoid gate); and the router weight's float32 copy, 4 h E bytes a layer

    This is the mode with the experts split over TP (``--moe-parallel tp``); with expert parallelism (ep) the
    routed rows a rank holds follow the routing (k T / t on average), and the MoE term is that mode's estimate.
    """
    t, h, a, d = tp, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    sp = sequence_parallel and t > 1
    s = t if sp else 1
    moe, k = cfg.moe, cfg.moe.num_experts_per_tok
    heads, kv = a / t, max(cfg.num_key_value_heads // t, 1)
    norms = 2 * (3 * h + 2) / s
    attention = h / s + 2 * heads + 4 + 2 * heads * d
    attention += (heads + 2 * kv) * d + (heads + kv) * d if kv == heads else 3 * heads * d
    if cfg.qk_norm:
        attention += 3 * (heads + kv) * d + 2 * (heads + kv)
    shared = moe.shared_size if moe.shared_expert_gate or moe.n_shared_experts else 0
    sparse = (6 * k * moe.moe_intermediate_size / t + 14 * k + (2 * h + 2 * moe.n_routed_experts + 4 * k) / s
              + (h / s if sp else k * h) + ((2 * k + 2) / s if moe.norm_topk_prob else 0))
    if shared:
        sparse += (h / s if not sp else 0) + 5 * shared / t + 1 + (1 / t if sp else 0)
    per_token = {"dense": norms + attention + h / s + 4 * cfg.intermediate_size / t, "sparse": norms + attention + sparse}
    qkv_weight = 2 * h * (heads + 2 * kv) * d if cfg.num_key_value_heads < t else 0
    by_type = {kind: int(BYTES_16BIT * tokens * v + qkv_weight + (4 * h * moe.n_routed_experts if kind == "sparse" else 0))
               for kind, v in per_token.items()}
    counts = {kind: cfg.layer_types.count(kind) for kind in by_type}
    return {
        "model": cfg.architecture,
        "tp": t,
        "tokens": tokens,
        "sequence_parallel": sp,
        "moe_parallel": cfg.moe_parallel,
        "formula": "norms + attention + (dense MLP | MoE: routed top-k experts, router, shared expert), per rank; "
                   "see sp_core/app/memory.py (qwen_moe_report)",
        "activation_bytes_per_layer": by_type["sparse"],
        "activation_bytes_per_layer_by_type": by_type,
        "layers_by_type": counts,
        "activation_bytes_all_layers": sum(by_type[kind] * n for kind, n in counts.items()),
        "bytes_per_value": BYTES_16BIT,
        "hidden_size": h,
        "num_attention_heads": a,
    }


def _decoder_layers(cfg: ModelConfig) -> Dict[str, torch.nn.Module]:
    """One decoder layer of each type this model has, bf16 (random weights; saved bytes do not depend on them)."""
    if cfg.mla is None:
        from sp_core.models.qwen import qwen_decoder_layer

        return {kind: qwen_decoder_layer(cfg, dtype=torch.bfloat16, layer_type=kind)
                for kind in dict.fromkeys(cfg.layer_types)}
    from sp_core.models.deepseek import DeepseekDecoderLayer

    return {kind: DeepseekDecoderLayer(cfg, kind, dtype=torch.bfloat16) for kind in dict.fromkeys(cfg.layer_types)}


def _measure_rank(model_dir: str, tokens: int, moe_parallel: str = "tp") -> Dict[str, int]:
    from sp_core.mpu import platform

    cfg = ModelConfig.from_pretrained(model_dir, moe_parallel)
    torch.manual_seed(0)  # replicated weights (the router's) equal on every rank
    with torch.device(platform.current_device()):  # the collectives' device (NCCL needs the GPU's tensors)
        return {kind: _saved_bytes(layer, cfg, tokens) for kind, layer in _decoder_layers(cfg).items()}


def _saved_bytes(layer: torch.nn.Module, cfg: ModelConfig, tokens: int) -> int:
    from sp_core import mpu
    from sp_core.layers import PackedBatch

    param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in layer.buffers()}
    p = mpu.default_context()
    batch, real = PackedBatch([tokens]), tokens
    if p.cp_size > 1:  # this CP rank's part of the sequence (the zig-zag split)
        from sp_core.layers.context_parallel import ContextParallelBatch

        batch = ContextParallelBatch.zigzag([tokens], p.cp_rank, p.cp_size, p.size)
        positions, real = batch.key_position[batch.own].clamp(min=0), batch.num_tokens
    elif p.sequence_parallel_active:
        positions = mpu.pad_1d(torch.arange(tokens), p)
    else:
        positions = torch.arange(tokens)
    rows = positions.shape[0] // p.size if p.sequence_parallel_active else positions.shape[0]
    hidden = torch.randn(rows, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    storages = {}

    def pack(x: torch.Tensor):
        storage = x.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        layer(hidden, positions, batch, real)
    return sum(storages.values())


def measure(model_dir: str, tp: int, tokens: int, sequence_parallel: bool, moe_parallel: str = "tp",
            cp: int = 1) -> Dict:
    """Bytes saved for backward by one decoder layer on rank 0 (bfloat16 activations, CPU ranks; cp x tp
    ranks): ``saved_bytes_per_rank`` (an MoE layer where the model has one), and per layer type."""
    from sp_core.procs.launch import run_ranks

    by_type = run_ranks(cp * tp, _measure_rank, model_dir, tokens, moe_parallel, sequence_parallel=sequence_parallel,
                        tp=tp, cp=cp)[0]
    out = {"saved_bytes_per_rank": by_type.get("sparse", by_type["dense"])}
    if len(by_type) > 1:
        out["saved_bytes_per_rank_by_type"] = by_type
    return out
