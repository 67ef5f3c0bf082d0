#!/usr/bin/env bash
# Round 5 of issue 19, one device call (2 or 4 GPUs): the async-TP forms "split" (the plain NCCL collective in
# flight beside part of the GEMM) and "copy_engine" (peers' rows moved by the copy engines, no SMs taken)
# measured per op and end to end against strong TP, in the same call.
#   1. tests/test_fused.py on NCCL (every form against the unfused layers; bf16);
#   2. benchmarks/async_tp_bench.py: every form per Qwen3-8B linear and M -> a decision table;
#   3. bench.py, strong TP vs TP-SP vs TP-SP + async TP with that table (prefill 2K / 8K / 32K, training 8K);
#   4. bench.py with ASYNC (default copy_engine) forced everywhere (prefill 8K / 32K, training 8K), strong TP
#      again beside it;
#   5. with MEGATRON_TP set: megatron_bench.py at that t, 2K tokens, profiled.
#   OUT=$OUT bash scripts/gpu_round5_perf.sh        (about 9 minutes; stops starting steps after BUDGET s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/round5}
BUDGET=${BUDGET:-560}
TP=${TP:-$(python3 -c 'import torch; n = torch.cuda.device_count(); print("4,2" if n >= 4 else n)')}
# shellcheck source=scripts/gpu_steps.sh
source scripts/gpu_steps.sh
set_up_device

step fused_tests 90 python3 -m pytest tests/test_fused.py -v -p no:cacheprovider
step async_tp 150 python3 benchmarks/async_tp_bench.py --tp "$TP" --rows 2048,4096,8192,16384,32768 --out "$OUT/async_tp"
TABLE="$OUT/async_tp/async_tp_table.json"
[ -f "$TABLE" ] || TABLE=""
step bench_table 200 env SP_CORE_ASYNC_TP_TABLE="$TABLE" python3 benchmarks/bench.py --tp "$TP" \
  --tokens 2048,8192,32768 --train-tokens 8192 --variants tp,sp,async_sp --iters 10 --profile-tokens 8192 \
  --out "$OUT/bench_table"
step bench_forced 150 python3 benchmarks/bench.py --tp "$TP" --tokens 8192,32768 --train-tokens 8192 \
  --variants tp,async_sp --async-tp "${ASYNC:-copy_engine}" --iters 10 --profile-tokens 8192 --out "$OUT/bench_forced"
if [ -n "${MEGATRON_TP:-}" ]; then  # 5. inside Megatron, 2K tokens, core vs native (unfused / SDPA), profiled
  step megatron 100 python3 benchmarks/megatron_bench.py --tp "$MEGATRON_TP" --tokens 2048 --profile --out "$OUT/megatron"
fi
note "round5: done in $SECONDS s"
tar -C "$OUT" -czf "$OUT/all.tgz" --exclude all.tgz . 2>/dev/null  # the device tool returns few files: all in one
