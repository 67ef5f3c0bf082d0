"""Bytes saved for backward by one decoder layer per rank (sp-core memory --measure), TP vs TP-SP,
for a Qwen3-shaped and a DeepSeek-V3-shaped layer, and with context parallelism (cp x tp); plus the
formula at DeepSeek-V3's real shape.

Runs on CPU (gloo ranks); writes docs/memory.md.  Usage, from the repository root:

    python -m benchmarks.memory_table
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from sp_core.app.tiny import make_checkpoint

TOKENS = 1024
SHAPE = dict(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, num_hidden_layers=1)


# DeepSeek-V3's head dims and latent proportions (q_lora : kv_lora : hidden = 1536 : 512 : 7168, nope 128,
# rope 64, v 128), a quarter of its heads and a smaller hidden / expert count, so that a layer runs on CPU.
DEEPSEEK_SHAPE = dict(vocab_size=1000, hidden_size=1792, intermediate_size=4608, num_attention_heads=32,
                      num_key_value_heads=32, q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=512, n_routed_experts=16,
                      num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, num_hidden_layers=2,
                      first_k_dense_replace=1)
DEEPSEEK_V3 = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
                   intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                   num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
                   n_group=8, topk_group=4, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, mscale=1.0,
                                     mscale_all_dim=1.0, beta_fast=32, beta_slow=1), rope_theta=10000)


def measure(ckpt, tp, sp, moe="tp", cp=1):
    flag = "--sequence-parallel" if sp else "--no-sequence-parallel"
    out = subprocess.run([sys.executable, "-m", "sp_core.app.cli", "memory", "--model", ckpt, "--tp", str(tp),
                          "--tokens", str(TOKENS), flag, "--measure", "--moe-parallel", moe, "--cp", str(cp)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def context_parallel_lines(ckpt):
    """cp x tp rows for the DeepSeek-V3-shaped layer, and the bytes gathered over CP per layer."""
    from sp_core.app import memory
    from sp_core.models import ModelConfig

    cfg = ModelConfig.from_pretrained(ckpt)
    lines = ["", "## Context parallelism (cp x tp) on the DeepSeek-V3-shaped layers", "",
             f"The same layers and T = {TOKENS} tokens, split over cp ranks (the zig-zag split) and, inside each, over",
             "tp ranks with SP. Each rank keeps the latent `[kv_lat | k_pe]` of its own tokens only: the CP gather",
             "and the attention over it are recomputed in backward (selective recomputation), so a layer saves",
             "at most (bytes at cp 1 x tp 1) / (cp t); what the attention kernel would have stored over the",
             "gathered keys (CPU SDPA: its probabilities, here) is not saved at all, hence ratios below 1.", "",
             "| cp | tp | SP | dense layer: saved bytes / rank | ratio to (cp1 tp1) / (cp t) | MoE layer: saved bytes / rank "
             "| ratio to (cp1 tp1) / (cp t) |", "|---|---|---|---|---|---|---|"]
    base = None
    for cp, tp, sp in ((1, 1, False), (1, 2, True), (2, 1, False), (2, 2, True), (4, 1, False)):
        by_type = measure(ckpt, tp, sp, cp=cp)["saved_bytes_per_rank_by_type"]
        base = base or by_type
        lines.append(f"| {cp} | {tp} | {'on' if sp else 'off'} | {by_type['dense']:,} | "
                     f"{by_type['dense'] * cp * tp / base['dense']:.3f} | {by_type['sparse']:,} | "
                     f"{by_type['sparse'] * cp * tp / base['sparse']:.3f} |")
    v3 = ModelConfig.from_dict(DEEPSEEK_V3)
    width = memory.cp_gathered_values_per_token(v3, 2)
    heads = v3.num_attention_heads * (v3.mla.qk_head_dim + v3.mla.v_head_dim)
    lines += ["", "Bytes each rank gathers over CP per layer (`cp_gather_bytes_per_layer` in `sp-core memory --cp N`):",
              "the gathered state of all T tokens in 16-bit, of which a rank receives (cp-1)/cp. At DeepSeek-V3's",
              f"real shape, per token: MLA's `[kv_lat | k_pe]` = {width} values (V3.2 adds its index key, 128),",
              f"against {heads:,} for the 128 heads' keys and values (a CP that gathers K/V heads) -- per TP rank",
              f"{heads // 2:,} at t = 2: the latent is {heads // 2 / width:.0f}x smaller. Qwen (GQA) gathers this TP",
              "rank's K and V heads (2 x kv_heads/t x head_dim values per token).", "",
              "| model | T | cp | tp | values gathered per token | bytes gathered per layer per rank |",
              "|---|---|---|---|---|---|"]
    for tokens, cp, tp in ((32768, 2, 2), (131072, 2, 2), (131072, 4, 4)):
        r = memory.report(v3, tp, tokens, True, cp)
        lines.append(f"| DeepSeek-V3 | {tokens:,} | {cp} | {tp} | {r['cp_gathered_values_per_token']} | "
                     f"{r['cp_gather_bytes_per_layer']:,} |")
    return lines


def deepseek_lines():
    from sp_core.app import memory
    from sp_core.models import ModelConfig

    ckpt = make_checkpoint("deepseek-v3", os.path.join(tempfile.mkdtemp(), "deepseek-v3"), **DEEPSEEK_SHAPE)
    lines = ["", "## DeepSeek-V3-shaped layers (MLA + dense MLP, MLA + MoE)", "",
             f"V3's head dims and latent proportions, scaled to run on CPU ({json.dumps(DEEPSEEK_SHAPE)}),",
             f"T = {TOKENS} tokens, bf16. Under SP MLA saves its latent (q_lora + kv_lora + rope = "
             f"{384 + 128 + 64} values per token here, 2112 for V3) as the token shard and re-gathers it in",
             "backward; moe=tp: TP-sharded experts, moe=ep: expert parallelism (rank 0's bytes: its experts'",
             "share of the routed rows, which follows the routing).", "",
             "| tp | SP | moe | dense layer: saved bytes / rank | ratio to t=1 / t | MoE layer: saved bytes / rank | ratio to t=1 / t |",
             "|---|---|---|---|---|---|---|"]
    base = None
    for tp, sp, moe in ((1, False, "tp"), (2, False, "tp"), (2, True, "tp"), (2, True, "ep"), (4, False, "tp"),
                        (4, True, "tp"), (4, True, "ep")):
        by_type = measure(ckpt, tp, sp, moe)["saved_bytes_per_rank_by_type"]
        base = base or by_type
        lines.append(f"| {tp} | {'on' if sp else 'off'} | {moe} | {by_type['dense']:,} | "
                     f"{by_type['dense'] * tp / base['dense']:.3f} | {by_type['sparse']:,} | "
                     f"{by_type['sparse'] * tp / base['sparse']:.3f} |")
    lines += context_parallel_lines(ckpt)
    v3 = ModelConfig.from_dict(DEEPSEEK_V3)
    lines += ["", "## DeepSeek-V3 (real shape), the formula (`sp-core memory`, no measurement)", "",
              "Per layer, T = 4096 tokens, 16-bit values; L = q_lora + kv_lora + rope = 2112 (the MLA latent).",
              "Formula: " + " ".join(line.strip() for line in memory.deepseek_report.__doc__.split("\n\n")[0].splitlines()),
              "", "```", textwrap.dedent(memory.deepseek_report.__doc__.split("\n\n")[1]).strip("\n"), "```", "",
              "| tp | SP | MLA + dense MLP (bytes) | MLA + MoE (bytes) |", "|---|---|---|---|"]
    for tp, sp in ((1, False), (2, False), (2, True), (4, False), (4, True), (8, False), (8, True)):
        r = memory.report(v3, tp, 4096, sp)["activation_bytes_per_layer_by_type"]
        lines.append(f"| {tp} | {'on' if sp else 'off'} | {r['dense']:,} | {r['sparse']:,} |")
    lines += ["", "The formula's terms are in `sp_core/app/memory.py` (`deepseek_report`): with SP every term is",
              "divided by t; without SP the norm inputs, the latent and the rows sent to the experts cover all",
              "T tokens on every rank."]
    return lines


def main():
    ckpt = make_checkpoint("qwen3", os.path.join(tempfile.mkdtemp(), "qwen3"), **SHAPE)
    rows, base = [], None
    for tp, sp in ((1, False), (2, False), (2, True), (4, False), (4, True)):
        r = measure(ckpt, tp, sp)
        base = base or r["saved_bytes_per_rank"]
        rows.append((tp, sp, r["saved_bytes_per_rank"], r["saved_bytes_per_rank"] * tp / base,
                     r["activation_bytes_per_layer_selective"]))
    lines = ["# Activation memory per rank: TP vs TP-SP", "",
             f"One Qwen3-shaped decoder layer ({json.dumps(SHAPE)}), T = {TOKENS} tokens, bf16 activations,",
             "bytes saved for backward measured with saved-tensor hooks on rank 0 (`sp-core memory --measure`,",
             "CPU gloo ranks). Reproduce: `python -m benchmarks.memory_table`.", "",
             "| tp | SP | saved bytes / rank | saved / ((bytes at t=1) / t) | paper, selective (bytes) |",
             "|---|---|---|---|---|"]
    for tp, sp, saved, ratio, paper in rows:
        lines.append(f"| {tp} | {'on' if sp else 'off'} | {saved:,} | {ratio:.3f} | {paper:,} |")
    lines += ["", "With SP the saved bytes per rank are (bytes at t=1)/t (the rotary tables, which cover all",
              "tokens, are recomputed in backward rather than saved); TP without SP keeps the replicated",
              "norm / residual inputs of all tokens on every rank, as the paper's 10 sbh term says.",
              "The CPU SDPA kernel stores attention probabilities (the paper's 5as/h term), so absolute",
              "numbers are above the selective formula; fused attention on GPU does not store them."]
    lines += deepseek_lines()
    os.makedirs("docs", exist_ok=True)
    with open("docs/memory.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
