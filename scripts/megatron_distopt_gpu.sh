#!/usr/bin/env bash
# On a machine with >= 2 GPUs (device tool, kind nvidia-h100-x2): Megatron's distributed optimizer on NCCL,
# its checkpoint format fully_sharded_model_space (flattened ranges), saved at tp 1 x dp 2 and resumed at
# tp 2 x dp 1; the resumed losses must equal the uninterrupted run's (tests/test_megatron_paths.py, the test
# named *distributed_optimizer*, as on CPU). Needs the megatron-core 0.19.2 cp312 wheel in .whl/ (carried).
#   bash scripts/megatron_distopt_gpu.sh      # about 2 minutes; log in $OUT (default out/megatron_distopt_gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/megatron_distopt_gpu}
mkdir -p "$OUT"
fail() { echo "megatron_distopt_gpu: FAILED: $*" | tee -a "$OUT/summary.txt" >&2; exit 1; }

ls .whl/megatron_core-*cp312*.whl >/dev/null 2>&1 || fail "no megatron-core cp312 wheel in .whl/ (carry .whl)"
# shellcheck source=/dev/null
source benchmarks/device_setup.sh || fail "benchmarks/device_setup.sh could not install the carried wheels"
export CUDA_DEVICE_MAX_CONNECTIONS=1
python3 -c 'import torch, megatron.core as m; n = torch.cuda.device_count(); print(f"megatron-core {m.__version__}, {n} GPUs"); assert n >= 2, "needs >= 2 GPUs"' \
  || fail "pre-flight (see above)"
timeout 500 python3 -m pytest tests/test_megatron_paths.py -k distributed_optimizer -v -s -p no:cacheprovider \
  >"$OUT/distopt_gpu.log" 2>&1
rc=$?
grep -E "PASSED|FAILED|SKIPPED|Error|assert" "$OUT/distopt_gpu.log" | tail -n 20
[ $rc -eq 0 ] || fail "the distributed-optimizer checkpoint test failed (log: $OUT/distopt_gpu.log)"
echo "megatron_distopt_gpu: OK" | tee -a "$OUT/summary.txt"
