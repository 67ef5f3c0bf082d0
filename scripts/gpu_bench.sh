#!/usr/bin/env bash
# GPU benchmarks by suite, one device call (device tool, a machine with 2 or 4 GPUs), from any directory:
#   OUT=$OUT bash scripts/gpu_bench.sh SUITE [SUITE ...]     # e.g. tp-vs-sp megatron host-overhead
#   bash scripts/gpu_bench.sh list                           # the suites, their steps, as they would run
# Each step is one command under a timeout capped by what is left of BUDGET seconds (default 560: a 10-minute
# call), logged to $OUT/<step>.log; $OUT/summary.txt has each step's exit status, and $OUT/all.tgz every file
# (the device tool returns few files). Steps that need megatron-core want its cp312 wheel in .whl/ (carried).
# Settings: TPS (tensor-parallel sizes; default 4,2 on 4+ GPUs, else the GPU count), TP (one size: the
# largest of TPS), ASYNC (the form async-tp forces, default copy_engine), TABLE (an async-TP decision table
# for async-tp; default the one async-tp-table wrote to $OUT, else the committed one).
#
# The suites are data: SUITES below, name -> lines of "STEP TIMEOUT COMMAND..." (expanded when the step
# runs, so $TP and $OUT are the run's); a line "@ FUNCTION" runs a helper of this file without a timeout.
# They replace issue 19's scripts/gpu_round{3,4,5}_*.sh (git history): round 3 = collectives nccl-setting
# megatron; round 4 = check-deepseek-dp tp-vs-sp megatron before host-overhead; round 5 = check-fused
# async-tp-table async-tp megatron; round 5's confirming call = async-tp-confirm deepseek-async-tp.
set -uo pipefail
cd "$(dirname "$0")/.."

declare -A ABOUT SUITES
ABOUT[tp-vs-sp]="strong TP vs TP-SP in the core, prefill 2K / 8K / 32K and training 8K, profiled at 8K"
SUITES[tp-vs-sp]='
bench 170 python3 -m benchmarks.bench --tp "$TPS" --tokens 2048,8192,32768 --train-tokens 8192 --variants tp,sp --iters 10 --profile-tokens 8192 --out "$OUT/bench"'

ABOUT[megatron]="a training step inside Megatron at t = TP, 2K tokens: native (unfused attention), native + SDPA, the core; profiled"
SUITES[megatron]='
megatron 170 python3 -m benchmarks.megatron_bench --tp "$TP" --tokens 2048 --iters 10 --variants native,native_sdpa,core --profile --out "$OUT/megatron"'

ABOUT[host-overhead]="ATen ops, collectives and host time per decoder layer at t = TP"
SUITES[host-overhead]='
host_overhead 80 python3 -m benchmarks.host_overhead --tp "$TP" --out "$OUT/host_overhead"'

ABOUT[collectives]="all-gather + reduce-scatter vs one all-reduce, through sp_core.mpu and raw, NCCL default / Ring / Simple"
SUITES[collectives]='
collectives_default 120 env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,GRAPH,TUNING,ENV NCCL_DEBUG_FILE="$OUT/nccl_debug/%h.%p.log" python3 -m benchmarks.collective_bench --tp "$TPS" --tokens 2048,8192,32768 --label default --out "$OUT"
collectives_ring 90 env NCCL_ALGO=Ring python3 -m benchmarks.collective_bench --tp "$TP" --tokens 2048,8192,32768 --label ring --out "$OUT"
collectives_simple 90 env NCCL_PROTO=Simple python3 -m benchmarks.collective_bench --tp "$TP" --tokens 2048,8192,32768 --label simple --out "$OUT"
@ collectives_compare'

ABOUT[nccl-setting]="strong TP vs TP-SP at t = TP, 8K prefill, NCCL's default vs the setting collectives found fastest (run after collectives)"
SUITES[nccl-setting]='
@ pick_nccl_setting
bench_default 150 python3 -m benchmarks.bench --tp "$TP" --tokens 8192 --train-tokens "" --iters 10 --profile-tokens 8192 --variants tp,sp --out "$OUT/bench_default"
bench_picked 150 env $PICK python3 -m benchmarks.bench --tp "$TP" --tokens 8192 --train-tokens "" --iters 10 --profile-tokens 8192 --variants tp,sp --out "$OUT/bench_picked"
@ nccl_setting_summary'

ABOUT[before]="tp-vs-sp and megatron with the tree in before/ (git archive COMMIT sp_core adapters benchmarks tests/support | tar -x -C before; carried)"
SUITES[before]='
megatron_before 80 "${BEFORE[@]}" python3 -m benchmarks.megatron_bench --tp "$TP" --tokens 2048 --profile --out "$OUT/megatron_before"
bench_before 100 "${BEFORE[@]}" python3 -m benchmarks.bench --tp "$TP" --tokens 2048,8192 --train-tokens 8192 --variants tp,sp --iters 10 --out "$OUT/bench_before"'

ABOUT[async-tp-table]="every async-TP form per Qwen3-8B linear and M -> a decision table (\$OUT/async_tp/async_tp_table.json)"
SUITES[async-tp-table]='
async_tp 150 python3 -m benchmarks.async_tp_bench --tp "$TPS" --rows 2048,4096,8192,16384,32768 --out "$OUT/async_tp"'

ABOUT[async-tp]="strong TP vs TP-SP vs TP-SP + async TP with TABLE end to end, then ASYNC forced everywhere"
SUITES[async-tp]='
@ pick_table
bench_table 200 env SP_CORE_ASYNC_TP_TABLE="$TABLE" python3 -m benchmarks.bench --tp "$TPS" --tokens 2048,8192,32768 --train-tokens 8192 --variants tp,sp,async_sp --iters 10 --profile-tokens 8192 --out "$OUT/bench_table"
bench_forced 150 python3 -m benchmarks.bench --tp "$TPS" --tokens 8192,32768 --train-tokens 8192 --variants tp,async_sp --async-tp "$ASYNC" --iters 10 --profile-tokens 8192 --out "$OUT/bench_forced"'

ABOUT[async-tp-confirm]="the committed async-TP table end to end twice against strong TP, ASYNC forced between them"
SUITES[async-tp-confirm]='
bench_table_a 120 python3 -m benchmarks.bench --tp "$TPS" --tokens 2048,8192,32768 --train-tokens 8192 --variants tp,sp,async_sp --iters 10 --profile-tokens 8192 --out "$OUT/bench_table_a"
confirm_forced 90 python3 -m benchmarks.bench --tp "$TPS" --tokens 8192,32768 --train-tokens 8192 --variants tp,async_sp --async-tp "$ASYNC" --iters 10 --out "$OUT/confirm_forced"
bench_table_b 90 python3 -m benchmarks.bench --tp "$TPS" --tokens 4096,8192,32768 --train-tokens 8192 --variants tp,sp,async_sp --iters 10 --out "$OUT/bench_table_b"'

ABOUT[deepseek-async-tp]="DeepSeek-V3-shaped layers at t = TP, 8K prefill, async TP off and with the committed table"
SUITES[deepseek-async-tp]='
deepseek_off 100 env SP_CORE_ASYNC_TP=off python3 -m benchmarks.deepseek_bench --tp "$TP" --tokens 8192 --out "$OUT/deepseek_off"
deepseek_table 100 python3 -m benchmarks.deepseek_bench --tp "$TP" --tokens 8192 --out "$OUT/deepseek_table"'

ABOUT[deepseek]="DeepSeek-V3-shaped layers at t = TP: TP vs latent-gather TP-SP vs hidden-gather, MoE TP / EP, prefill and training, the V3.2 indexer"
SUITES[deepseek]='
deepseek 500 python3 -m benchmarks.deepseek_bench --tp "$TP" --tokens 2048,4096,8192,32768 --train-tokens 4096,8192 --train-tp "$TP" --iters 5 --profile-tokens 8192 --indexer-tokens 8192,32768 --out "$OUT/deepseek"'

ABOUT[deterministic]="the deterministic mode: core vs Megatron engine equality, batch invariance, and its cost at 8K (tiny Qwen3)"
SUITES[deterministic]='
deterministic 400 python3 -m benchmarks.deterministic_bench --tp "$TPS" --models qwen3 --tokens 8192 --iters 5 --out "$OUT/deterministic"'

ABOUT[batch-invariant]="the one-launch batch-invariant GEMM: invariance, speed against cuBLAS, the mode on the model"
SUITES[batch-invariant]='
batch_invariant 400 python3 -m benchmarks.batch_invariant_bench --tp "$TPS" --out "$OUT/batch_invariant"'

ABOUT[check-fused]="check: tests/test_fused.py on NCCL (every async-TP form against the unfused layers)"
SUITES[check-fused]='
fused_tests 90 python3 -m pytest tests/test_fused.py -v -p no:cacheprovider'

ABOUT[check-deepseek-dp]="check: DeepSeek TP 2 x DP 2 with the distributed optimizer on NCCL (4 GPUs)"
SUITES[check-deepseek-dp]='
dp_test 150 python3 -m pytest tests/test_megatron_deepseek.py -k data_parallel -v -s -p no:cacheprovider'

ABOUT[megatron-pretrain]="check: Megatron-LM's pretrain() with --sp-core, TP 2 + SP (scripts/megatron_pretrain_gpu.sh pretrain)"
SUITES[megatron-pretrain]='
megatron_pretrain 300 env OUT="$OUT/megatron_pretrain" bash scripts/megatron_pretrain_gpu.sh pretrain'

ABOUT[megatron-equality]="check: the DeepSeek training-equality test on NCCL (scripts/megatron_pretrain_gpu.sh equality)"
SUITES[megatron-equality]='
megatron_equality 590 env OUT="$OUT/megatron_equality" bash scripts/megatron_pretrain_gpu.sh equality'

ABOUT[megatron-distopt]="check: the distributed optimizer's checkpoint saved at tp 1 x dp 2, resumed at tp 2 (scripts/megatron_pretrain_gpu.sh distopt)"
SUITES[megatron-distopt]='
megatron_distopt 300 env OUT="$OUT/megatron_distopt" bash scripts/megatron_pretrain_gpu.sh distopt'

ABOUT[refit]="the refit's GPU transport (one GPU): tests/test_refit_cuda_ipc.py, then a Qwen3-8B-shaped refit by CUDA IPC, /dev/shm and disk"
SUITES[refit]='
refit_tests 180 python3 -m pytest tests/test_refit_cuda_ipc.py tests/test_refit_transport.py -v -rs -p no:cacheprovider
refit_space 10 df -h /dev/shm /tmp .
refit_bench 400 python3 -m benchmarks.refit_gpu --out "$OUT/refit_gpu"'

ORDER=(tp-vs-sp megatron host-overhead collectives nccl-setting before async-tp-table async-tp async-tp-confirm
       deepseek-async-tp deepseek deterministic batch-invariant check-fused check-deepseek-dp megatron-pretrain
       megatron-equality megatron-distopt refit)

# -- helpers that suites call ("@ NAME") --------------------------------------------------------------

collectives_compare() {  # one table over the NCCL settings measured, at four (t, T)
  for at in "$TP,8192" "$TP,2048" "$TP,32768" 2,8192; do
    python3 -m benchmarks.collective_bench --compare "$OUT"/collectives_*.json --compare-at "$at" 2>&1
  done >"$OUT/collectives_compare.md"
  cat "$OUT/collectives_compare.md" >>"$SUMMARY"
}

pick_nccl_setting() {  # PICK: the NCCL setting collectives found fastest for the chained pair, else Ring
  PICK=$(python3 -m benchmarks.collective_bench --compare "$OUT"/collectives_*.json --compare-at "$TP,8192" \
    --print-env-of-best 2>/dev/null)
  [ -n "$PICK" ] || PICK="NCCL_ALGO=Ring"  # the default was fastest (or no data): Ring as the control
  note "NCCL setting for bench_picked: $PICK"
}

nccl_setting_summary() {
  python3 - "$OUT" "$PICK" <<'EOF' >>"$SUMMARY" 2>&1
import json, os, sys
out, pick = sys.argv[1], sys.argv[2]
print(f"\n## t = TP, 8K-token prefill by NCCL setting (ms, median of 10; kernel ms per call on rank 0)\n")
print("| NCCL | strong TP ms | TP-SP ms | SP/TP | TP kernels (gemm / attn / norm / other / collective) | SP kernels |")
print("|---|---|---|---|---|---|")
for label, env in (("bench_default", "default"), ("bench_picked", pick)):
    path = os.path.join(out, label, "results.json")
    if not os.path.exists(path):
        print(f"| {env} | (no results: see {label}.log) | | | | |")
        continue
    for r in json.load(open(path))["prefill"]:
        k = lambda v: " / ".join(f"{r[v + '_kernels'].get(c, float('nan')):.2f}" for c in
                                 ("gemm", "attention", "norm+rotary", "other", "collective")) if v + "_kernels" in r else "-"
        print(f"| {env} | {r['tp_ms']:.2f} | {r['sp_ms']:.2f} | **{r['sp_over_tp']:.3f}** | {k('tp')} | {k('sp')} |")
EOF
}

pick_table() {  # TABLE: as given, else the one async-tp-table wrote here, else the committed one ("")
  if [ -z "${TABLE:-}" ] && [ -f "$OUT/async_tp/async_tp_table.json" ]; then TABLE="$OUT/async_tp/async_tp_table.json"; fi
  TABLE=${TABLE:-}
  note "async-TP table: ${TABLE:-the committed one}"
}

# -- running ------------------------------------------------------------------------------------------

note() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # name, timeout s, command...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then note "== $name: SKIPPED (budget of $BUDGET s spent)"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local begin=$SECONDS
  echo "== $name (timeout $limit s; log $OUT/$name.log)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  note "== $name: rc $rc, $((SECONDS - begin)) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  [ $rc -eq 0 ] || tail -n 15 "$OUT/$name.log" | tee -a "$SUMMARY"
  return $rc
}

run_suite() {  # suite name; DRY=1: print the steps instead
  local line name limit
  [ "${DRY:-0}" = 1 ] || note "=== suite $1: ${ABOUT[$1]}"
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    read -r name limit _ <<<"$line"
    if [ "${DRY:-0}" = 1 ]; then echo "    $line"; continue; fi
    if [ "$name" = "@" ]; then "$limit"; continue; fi
    eval "step $line"
  done <<<"${SUITES[$1]}"
}

usage() {
  echo "usage: [OUT=dir] [BUDGET=s] [TPS=4,2] [TP=4] bash scripts/gpu_bench.sh SUITE [SUITE ...] | list"
  for s in "${ORDER[@]}"; do echo "  $s: ${ABOUT[$s]}"; done
}

[ $# -gt 0 ] || { usage; exit 2; }
for s in "$@"; do
  [ "$s" = list ] || [ -n "${SUITES[$s]+x}" ] || { echo "gpu_bench: unknown suite '$s'" >&2; usage >&2; exit 2; }
done
if [ "$1" = list ]; then
  for s in "${ORDER[@]}"; do echo "$s: ${ABOUT[$s]}"; DRY=1 run_suite "$s"; done
  exit 0
fi

OUT=${OUT:-out/gpu_bench}
BUDGET=${BUDGET:-560}
ASYNC=${ASYNC:-copy_engine}
PICK=""
mkdir -p "$OUT/nccl_debug"
OUT=$(cd "$OUT" && pwd)  # absolute: suite "before" runs in before/
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
# shellcheck source=/dev/null
source benchmarks/device_setup.sh || { note "FAILED: benchmarks/device_setup.sh"; exit 1; }
ls .whl/megatron_core-*cp312*.whl >/dev/null 2>&1 || note "WARNING: no megatron-core cp312 wheel in .whl/: Megatron steps will fail"
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
TPS=${TPS:-$([ "$GPUS" -ge 4 ] && echo 4,2 || echo "$GPUS")}
TP=${TP:-$(tr , '\n' <<<"$TPS" | sort -n | tail -n 1)}
python3 -c 'import torch, sys; print(f"python {sys.version.split()[0]} | torch {torch.__version__} | NCCL",
  ".".join(map(str, torch.cuda.nccl.version())), f"| {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")' \
  | tee -a "$SUMMARY"
note "suites: $* | TPS=$TPS TP=$TP | $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
{
  env | grep -E '^(NCCL_|TORCH_NCCL_|CUDA_DEVICE_MAX|TORCH_SYMM|NVSHMEM_)' | sort
  nvidia-smi topo -m
  nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
} >"$OUT/machine.txt" 2>&1

BEFORE=(env -C before PYTHONPATH="$PWD/before:/tmp/before_site:/tmp/site")  # suite "before": the tree before a change
if [ -d before ]; then  # its adapters in place of this tree's
  mkdir -p /tmp/before_site && ln -sfn "$PWD/before/adapters/megatron" /tmp/before_site/sp_core_megatron
  note "before/: $(cat before/COMMIT 2>/dev/null)"
fi

for s in "$@"; do
  if [ "$s" = before ] && [ ! -d before ]; then note "=== suite before: SKIPPED (no before/ tree)"; continue; fi
  run_suite "$s"
done
note "gpu_bench: done in $SECONDS s; files in $OUT"
tar -C "$OUT" -czf "$OUT/all.tgz" --exclude all.tgz . 2>/dev/null
