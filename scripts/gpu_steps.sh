# Sourced by the scripts/gpu_round*.sh device scripts, after they set OUT and BUDGET (seconds): note (a line
# to the terminal and $OUT/summary.txt), step (one command under a timeout capped by what is left of BUDGET,
# logged to $OUT/<name>.log), machine (python, torch, NCCL and the GPUs in one line) and set_up_device
# (benchmarks/device_setup.sh, then the machine's line to the summary).
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
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

machine() {
  python3 -c 'import torch, sys; print(f"python {sys.version.split()[0]} | torch {torch.__version__} | NCCL",
    ".".join(map(str, torch.cuda.nccl.version())), f"| {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")'
}

set_up_device() {
  # shellcheck source=/dev/null
  source benchmarks/device_setup.sh || { note "FAILED: benchmarks/device_setup.sh"; exit 1; }
  machine | tee -a "$SUMMARY"
}
