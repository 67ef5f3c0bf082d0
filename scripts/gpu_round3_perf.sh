#!/usr/bin/env bash
# Round 3 of issue 19, one device call on 4 GPUs (4 x H200 or 4 x H100): why is TP-SP x1.27-1.35 of strong
# TP at t = 4, 8K prefill on 4 x H200 when 4 x H100 had x0.96?
#   1. collectives alone (benchmarks/collective_bench.py): AG + RS of [T, 4096] bf16 vs one all-reduce,
#      through sp_core.mpu and through raw torch.distributed, T = 2K / 8K / 32K, t = 2 and 4 under NCCL's
#      default, then t = 4 with NCCL_ALGO=Ring and with NCCL_PROTO=Simple (multicast stays off);
#   2. bench.py at t = 4, 8K prefill (no grad), strong TP vs TP-SP, by default and under the NCCL
#      setting the microbenchmark found fastest for the chained pair (NCCL_ALGO=Ring when that is the default);
#   3. inside Megatron at t = 4, 2K tokens: Megatron-native (its unfused attention), Megatron-native with
#      torch SDPA (the core's attention kernel), and the core (benchmarks/megatron_bench.py).
# Needs the megatron-core 0.19.2 cp312 wheel in .whl/ (carried). Everything goes to $OUT:
#   OUT=$OUT bash scripts/gpu_round3_perf.sh          (about 5-7 minutes; each step has its own timeout and
#                                                      the whole script stops starting steps after BUDGET s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/round3}
BUDGET=${BUDGET:-450}  # seconds; a step is given at most what is left of it
# shellcheck source=scripts/gpu_steps.sh
source scripts/gpu_steps.sh

ls .whl/megatron_core-*cp312*.whl >/dev/null 2>&1 || note "WARNING: no megatron-core cp312 wheel in .whl/: step 3 will fail"
set_up_device

{
  machine
  env | grep -E '^(NCCL_|TORCH_NCCL_|CUDA_DEVICE_MAX|TORCH_SYMM|NVSHMEM_)' | sort
  nvidia-smi topo -m
  nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
} >"$OUT/machine.txt" 2>&1
head -n 1 "$OUT/machine.txt" | tee -a "$SUMMARY"

# 1. collectives: NCCL's own view of the topology and tuning goes to nccl_debug/ (init only; no per-call logging)
mkdir -p "$OUT/nccl_debug"
step collectives_default 120 env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,GRAPH,TUNING,ENV \
  NCCL_DEBUG_FILE="$OUT/nccl_debug/%h.%p.log" \
  python3 benchmarks/collective_bench.py --tp 4,2 --tokens 2048,8192,32768 --label default --out "$OUT"
step collectives_ring 90 env NCCL_ALGO=Ring \
  python3 benchmarks/collective_bench.py --tp 4 --tokens 2048,8192,32768 --label ring --out "$OUT"
step collectives_simple 90 env NCCL_PROTO=Simple \
  python3 benchmarks/collective_bench.py --tp 4 --tokens 2048,8192,32768 --label simple --out "$OUT"
for at in 4,8192 4,2048 4,32768 2,8192; do
  python3 benchmarks/collective_bench.py --compare "$OUT"/collectives_*.json --compare-at "$at" >>"$OUT/collectives_compare.md" 2>&1
done
cat "$OUT/collectives_compare.md" >>"$SUMMARY"
PICK=$(python3 benchmarks/collective_bench.py --compare "$OUT"/collectives_*.json --compare-at 4,8192 --print-env-of-best 2>/dev/null)
[ -n "$PICK" ] || PICK="NCCL_ALGO=Ring"  # the default was fastest (or no data): Ring as the control
note "NCCL setting for the second bench.py run: $PICK"

# 2. the layers: strong TP vs TP-SP (async TP is off at t = 4 by the decision table, so "sp" is what users get)
BENCH=(python3 benchmarks/bench.py --tp 4 --tokens 8192 --train-tokens "" --iters 10 --profile-tokens 8192
       --variants tp,sp)
step bench_default 150 "${BENCH[@]}" --out "$OUT/bench_default"
# shellcheck disable=SC2086
step bench_picked 150 env $PICK "${BENCH[@]}" --out "$OUT/bench_picked"

# 3. inside Megatron, t = 4, 2K tokens: which attention each side runs is in every row
step megatron 170 python3 benchmarks/megatron_bench.py --tp 4 --tokens 2048 --iters 10 \
  --variants native,native_sdpa,core --out "$OUT/megatron"

python3 - "$OUT" "$PICK" <<'EOF' >>"$SUMMARY" 2>&1
import json, os, sys
out, pick = sys.argv[1], sys.argv[2]
print("\n## bench.py, t = 4, 8K-token prefill (strong baseline; ms, median of 10; kernel ms per call, rank 0)\n")
print("| NCCL | pass | strong TP ms | TP-SP ms | SP/TP | TP kernels (gemm / attn / norm / other / collective incl. waiting) | SP kernels |")
print("|---|---|---|---|---|---|---|")
for label, env in (("bench_default", "default"), ("bench_picked", pick)):
    path = os.path.join(out, label, "results.json")
    if not os.path.exists(path):
        print(f"| {env} | (no results: see {label}.log) | | | | | |")
        continue
    res = json.load(open(path))
    for kind in ("prefill", "train"):
        for r in res[kind]:
            k = lambda v: " / ".join(f"{r[v + '_kernels'].get(c, float('nan')):.2f}" for c in
                                     ("gemm", "attention", "norm+rotary", "other", "collective")) if v + "_kernels" in r else "-"
            print(f"| {env} | {kind} | {r['tp_ms']:.2f} | {r['sp_ms']:.2f} | **{r['sp_over_tp']:.3f}** | {k('tp')} | {k('sp')} |")
path = os.path.join(out, "megatron", "megatron.md")
print("\n## inside Megatron\n")
print(open(path).read() if os.path.exists(path) else "(no results: see megatron.log)")
EOF
note "round3: done in $SECONDS s; files in $OUT"
cat "$SUMMARY"
