"""In-memory refit on CPU: seconds and bytes per rank against the model's size, at matched layout (trainer tp 2
-> sglang tp 2) and resharded (trainer tp 2 -> sglang tp 1), and the on-paper numbers for real models
(docs/refit.md holds both).

    python -m benchmarks.refit_cpu --out $OUT          # -> $OUT/refit_cpu.json (3 sizes of Qwen3, tp 2)
    python -m benchmarks.refit_cpu --sizes large --server-tp 2 --bucket-mb 512,8   # one pass vs two (streamed)
    python -m benchmarks.refit_cpu --paper             # bytes per rank at tp 8 and seconds at stated bandwidths

Each size: one sglang engine (the adapter, tp 2) and one Megatron launch (SPCoreGPTModel, tp 2); the ranks
refit ``--repeats`` times per bucket size, the sizes taking turns (a new weight version each) and report each rank's bytes, buckets,
passes, the most shared memory it held at once, and the median seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

SIZES = {  # Qwen3 shapes (the embedded tiny one's family), growing
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
    "medium": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=32),
    "large": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
}


def _rank(model_dir, engine, repeats, bucket_mbs):
    from sp_core_megatron.cli_engine.engine import build_model
    from sp_core_megatron.refit import refit

    model = build_model(model_dir, 2, True)
    runs = {mb: [] for mb in bucket_mbs}
    for i in range(repeats):  # the bucket sizes take turns, so that a busy machine slows them alike
        for mb in bucket_mbs:
            runs[mb].append(refit(model, engine, f"bench-{mb}-{i}", bucket_bytes=int(mb * 2**20)))
    out = []
    for mb, results in runs.items():
        assert all(r.success for r in results), results[-1].message
        out.append({"bucket_mb": mb, "bytes": results[-1].bytes_moved, "full_tensors": results[-1].full_tensors,
                    "buckets": results[-1].buckets, "passes": results[-1].passes, "peak": results[-1].peak_bytes,
                    "seconds": statistics.median(r.seconds for r in results),
                    "params": sum(p.numel() for p in model.parameters())})
    return out


def measure(repeats: int, sizes=tuple(SIZES), server_tps=(2, 1), bucket_mbs=(512,)) -> list:
    from sp_core.app.tiny import make_checkpoint
    from sp_core.procs.launch import run_ranks
    from sp_core_sglang.cli_engine.engine import start_for_refit

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name, server_tp in [(size, s) for size in sizes for s in server_tps]:
            model_dir = make_checkpoint("qwen3", os.path.join(root, name), **SIZES[name])
            engine = start_for_refit(model_dir, server_tp, True)
            try:
                ranks = run_ranks(2, _rank, model_dir, engine, repeats, list(bucket_mbs))
            finally:
                engine.shutdown()
            for i, mb in enumerate(bucket_mbs):
                per = [r[i] for r in ranks]
                rows.append({"size": name, "server_tp": server_tp, "bucket_mb": mb,
                             "params_per_rank": [r["params"] for r in per], "bytes_per_rank": [r["bytes"] for r in per],
                             "buckets_per_rank": [r["buckets"] for r in per], "passes": per[0]["passes"],
                             "peak_shm_per_rank": [r["peak"] for r in per],
                             "full_tensors": sum(r["full_tensors"] for r in per),
                             "seconds": max(r["seconds"] for r in per), "load_average": os.getloadavg()[0]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


# -- on paper ------------------------------------------------------------------------------------------------

def _qwen_dense_layer(h, heads, kv, d, f, t):
    kv_local = max(kv // t, 1) * d  # fewer KV heads than ranks: each rank holds one, replicated
    return (h * heads * d // t + 2 * h * kv_local + heads * d * h // t  # q, k, v, o
            + 3 * h * f // t + 2 * h + 2 * d)  # mlp; two norms and the q/k norms (replicated)


def paper(t: int = 8, bytes_per_param: int = 2) -> list:
    """Bytes per rank for the served weights at tp ``t`` (sharded parts / t, replicated parts whole), bf16."""
    rows = []
    v, h = 151936, 4096  # Qwen3-8B
    per_rank = 2 * v * h // t + 36 * _qwen_dense_layer(h, 32, 8, 128, 12288, t) + h
    rows.append(("Qwen3-8B", per_rank))
    v, h = 151936, 2048  # Qwen3-30B-A3B: 48 layers, 128 experts of 768, router replicated
    attn = h * 32 * 128 // t + 2 * h * max(4 // t, 1) * 128 + 32 * 128 * h // t + 2 * h + 2 * 128
    moe = 128 * 3 * h * 768 // t + 128 * h
    rows.append(("Qwen3-30B-A3B", 2 * v * h // t + 48 * (attn + moe) + h))
    v, h = 129280, 7168  # DeepSeek-V3: 61 layers (3 dense of 18432), 256 routed + 1 shared of 2048, MLA
    mla = (h * 1536 + 1536 + 1536 * 128 * 192 // t + h * 576 + 512 + 512 * 128 * 256 // t + 128 * 128 * h // t
           + 2 * h)  # q_a, kv_a and their norms replicated (the core computes them on the token shard)
    dense = 3 * h * 18432 // t
    moe = (256 + 1) * 3 * h * 2048 // t + 256 * h + 256
    rows.append(("DeepSeek-V3", 2 * v * h // t + 61 * mla + 3 * dense + 58 * moe + h))
    return [(name, n * bytes_per_param) for name, n in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of: " + ", ".join(SIZES))
    parser.add_argument("--server-tp", default="2,1", help="comma-separated server tp sizes (trainer tp 2)")
    parser.add_argument("--bucket-mb", default="512", help="comma-separated bucket sizes in MiB (the refit's)")
    args = parser.parse_args()
    if args.paper:
        for name, nbytes in paper():
            print(f"{name}: {nbytes / 1e9:.2f} GB per rank (bf16, tp 8); {1e3 * nbytes / 1.5e12:.0f} ms at 1.5 TB/s "
                  f"(a same-GPU copy), {1e3 * nbytes / 4.5e11:.0f} ms at 450 GB/s (NVLink), "
                  f"{nbytes / 25e9:.1f} s at 25 GB/s (host shared memory)")
        return
    rows = measure(args.repeats, args.sizes.split(","), [int(t) for t in args.server_tp.split(",")],
                   [float(mb) for mb in args.bucket_mb.split(",")])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "refit_cpu.json"), "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
