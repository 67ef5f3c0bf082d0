#!/usr/bin/env bash
# Round 4 of issue 19, one device call on 4 GPUs: the host-side cut (fewer ops per layer) measured against
# the code before it, in the same call, plus the DeepSeek DP x EP / distributed-optimizer test on NCCL.
#   1. tests/test_megatron_deepseek.py -k data_parallel (TP 2 x DP 2, the distributed optimizer on CUDA);
#   2. bench.py, strong TP vs TP-SP, t = 4 and 2, prefill 2K / 8K / 32K and training 8K (this tree), then
#      t = 4 2K / 8K and training 8K with the tree in before/ (if present: `git archive <commit> sp_core adapters
#      benchmarks tests/support | tar -x -C before`, carried);
#   3. inside Megatron, t = 4, 2K tokens, with the profile (host enqueue, kernels by category): this tree,
#      then before/;
#   4. benchmarks/host_overhead.py at t = 4 (ops, collectives and host time per layer).
# Needs the megatron-core 0.19.2 cp312 wheel in .whl/ (carried). Everything goes to $OUT:
#   OUT=$OUT bash scripts/gpu_round4_perf.sh        (about 8-9 minutes; stops starting steps after BUDGET s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/round4}
BUDGET=${BUDGET:-560}
TP=${TP:-$(python3 -c 'import torch; print(4 if torch.cuda.device_count() >= 4 else torch.cuda.device_count())')}
# the t of steps 3 and 4; step 2 also runs t = 2 when TP is 4
# shellcheck source=scripts/gpu_steps.sh
source scripts/gpu_steps.sh
set_up_device

BEFORE=(env -C before PYTHONPATH="$PWD/before:/tmp/before_site:/tmp/site")  # the tree before the change
if [ -d before ]; then  # its adapters in place of this tree's
  mkdir -p /tmp/before_site && ln -sfn "$PWD/before/adapters/megatron" /tmp/before_site/sp_core_megatron
fi

[ -d before ] && note "before/: $(cat before/COMMIT 2>/dev/null)"

[ "$TP" -ge 4 ] && step dp_test 150 python3 -m pytest tests/test_megatron_deepseek.py -k data_parallel -v -s -p no:cacheprovider
BENCH_TP=$TP; [ "$TP" = 4 ] && BENCH_TP=4,2
step bench_after 170 python3 benchmarks/bench.py --tp "$BENCH_TP" --tokens 2048,8192,32768 --train-tokens 8192 \
  --variants tp,sp --iters 10 --profile-tokens 8192 --out "$OUT/bench_after"
step megatron_after 80 python3 benchmarks/megatron_bench.py --tp "$TP" --tokens 2048 --profile --out "$OUT/megatron_after"
if [ -d before ]; then
  step megatron_before 80 "${BEFORE[@]}" python3 benchmarks/megatron_bench.py --tp "$TP" --tokens 2048 --profile \
    --out "$OUT/megatron_before"
  step bench_before 100 "${BEFORE[@]}" python3 benchmarks/bench.py --tp "$TP" --tokens 2048,8192 --train-tokens 8192 \
    --variants tp,sp --iters 10 --out "$OUT/bench_before"
fi
step host_overhead 80 python3 benchmarks/host_overhead.py --tp "$TP" --out "$OUT/host_overhead"
note "round4: done in $SECONDS s"
tar -C "$OUT" -czf "$OUT/all.tgz" --exclude all.tgz . 2>/dev/null  # the device tool returns few files: all in one
