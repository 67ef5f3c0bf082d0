#!/usr/bin/env bash
# Round 5 of issue 19, the confirming call (2 GPUs): the committed async-TP table end to end, twice, against
# strong TP in the same call; copy_engine forced everywhere beside it; DeepSeek-V3-shaped layers with async TP
# off and with the table.
#   OUT=$OUT bash scripts/gpu_round5_confirm.sh        (about 6 minutes; stops starting steps after BUDGET s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/round5_confirm}
BUDGET=${BUDGET:-480}
TP=${TP:-2}
# shellcheck source=scripts/gpu_steps.sh
source scripts/gpu_steps.sh
set_up_device

step bench_table_a 120 python3 benchmarks/bench.py --tp "$TP" --tokens 2048,8192,32768 --train-tokens 8192 \
  --variants tp,sp,async_sp --iters 10 --profile-tokens 8192 --out "$OUT/bench_table_a"
step bench_forced 90 python3 benchmarks/bench.py --tp "$TP" --tokens 8192,32768 --train-tokens 8192 \
  --variants tp,async_sp --async-tp copy_engine --iters 10 --out "$OUT/bench_forced"
step bench_table_b 90 python3 benchmarks/bench.py --tp "$TP" --tokens 4096,8192,32768 --train-tokens 8192 \
  --variants tp,sp,async_sp --iters 10 --out "$OUT/bench_table_b"
step deepseek_off 100 env SP_CORE_ASYNC_TP=off python3 benchmarks/deepseek_bench.py --tp "$TP" --tokens 8192 \
  --out "$OUT/deepseek_off"
step deepseek_table 100 python3 benchmarks/deepseek_bench.py --tp "$TP" --tokens 8192 --out "$OUT/deepseek_table"
note "round5 confirm: done in $SECONDS s"
tar -C "$OUT" -czf "$OUT/all.tgz" --exclude all.tgz . 2>/dev/null  # the device tool returns few files: all in one
