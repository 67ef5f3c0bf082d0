#!/usr/bin/env bash
# On a GPU machine (device tool; kind nvidia-h100-x4: 2 GPUs for pretrain, 4 for the t = 4 equality test):
#   1. Megatron-LM's own training loop, megatron.training.pretrain(), with --sp-core, TP 2 + SP, mock data,
#      20 iterations each for a small Qwen3-shaped and a small DeepSeek-V3-shaped checkpoint;
#   2. the DeepSeek training-equality test on NCCL (t = 2 and 4, bfloat16 and float32);
#   3. Megatron's distributed optimizer on NCCL, checkpoint format fully_sharded_model_space (flattened
#      ranges): saved at tp 1 x dp 2, resumed at tp 2 x dp 1, the losses continue (the CPU test, on GPUs).
# Needs the megatron-core 0.19.2 cp312 wheel in .whl/ (carried). Logs go to $OUT (default out/megatron_gpu).
#   bash scripts/megatron_pretrain_gpu.sh pretrain   # step 1 (about 4 minutes)
#   bash scripts/megatron_pretrain_gpu.sh equality   # step 2 (about 6-8 minutes; 4 GPUs for t = 4)
#   bash scripts/megatron_pretrain_gpu.sh distopt    # step 3 (about 2 minutes)
#   bash scripts/megatron_pretrain_gpu.sh            # all three (may exceed a 10-minute call: run them apart)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/megatron_gpu}
WHAT=${1:-all}
mkdir -p "$OUT"
fail() { echo "megatron_pretrain_gpu: FAILED: $*" | tee -a "$OUT/summary.txt" >&2; exit 1; }

ls .whl/megatron_core-*cp312*.whl >/dev/null 2>&1 || fail "no megatron-core cp312 wheel in .whl/ (carry .whl)"
# shellcheck source=/dev/null
source benchmarks/device_setup.sh || fail "benchmarks/device_setup.sh could not install the carried wheels"
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron-LM requires it with TP on Hopper

python3 - <<'EOF' || fail "pre-flight (see above)"
import sys
import torch
import megatron.core
import megatron.training  # noqa: F401  (Python >= 3.12)
import transformers
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | megatron-core {megatron.core.__version__} | "
      f"transformers {transformers.__version__} | {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
assert torch.cuda.device_count() >= 2, "needs >= 2 GPUs"
EOF
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')

# small checkpoints, made by transformers from the embedded tiny presets, widened
CKPT=/tmp/sp_core_pretrain
if [ "$WHAT" = all ] || [ "$WHAT" = pretrain ]; then  # only pretrain() reads them
python3 - "$CKPT" <<'EOF' || fail "could not write the checkpoints"
import sys
from sp_core.app.tiny import make_checkpoint
root = sys.argv[1]
make_checkpoint("qwen3-train", f"{root}/qwen3", vocab_size=1024, hidden_size=256, intermediate_size=768,
                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32)
make_checkpoint("deepseek-v3", f"{root}/deepseek-v3", vocab_size=1024, hidden_size=256, intermediate_size=512,
                num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
                q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
print("checkpoints in", root)
EOF
fi

pretrain() {  # name, then Megatron's shape flags for that checkpoint
  local name=$1; shift
  local log="$OUT/pretrain_${name}.log"
  echo "== pretrain() with --sp-core: $name (log: $log)"
  timeout 270 python3 -m torch.distributed.run --nproc-per-node 2 --master-port 29517 \
    -m sp_core_megatron.pretrain_gpt \
    --sp-core --sp-core-hf-model "$CKPT/$name" \
    --tensor-model-parallel-size 2 --sequence-parallel \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 1024 --no-create-attention-mask-in-dataloader \
    --seq-length 256 --max-position-embeddings 256 --micro-batch-size 4 --global-batch-size 8 \
    --train-iters 20 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --clip-grad 1.0 \
    --bf16 --transformer-impl local --no-gradient-accumulation-fusion --no-rope-fusion --normalization RMSNorm --swiglu \
    --disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type rope \
    --log-interval 1 --eval-iters 0 --eval-interval 1000 --seed 1234 "$@" >"$log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || { tail -n 40 "$log" >&2; fail "pretrain $name exited with $rc"; }
  python3 - "$log" "$name" <<'EOF' || fail "pretrain $name: no falling loss in Megatron's iteration log"
import re, sys
lines = [l for l in open(sys.argv[1]) if re.search(r"iteration\s+\d+/\s*\d+", l) and "lm loss" in l]
losses = [float(re.search(r"lm loss: ([0-9.E+-]+)", l).group(1)) for l in lines]
print(f"{sys.argv[2]}: {len(losses)} iterations logged; lm loss {losses[0]:.4f} -> {losses[-1]:.4f}")
assert len(losses) == 20 and losses[-1] < losses[0], losses
EOF
}

if [ "$WHAT" = all ] || [ "$WHAT" = pretrain ]; then
  pretrain qwen3 --num-layers 4 --hidden-size 256 --ffn-hidden-size 768 --num-attention-heads 8 \
    --group-query-attention --num-query-groups 4 --kv-channels 32 --qk-layernorm
  pretrain deepseek-v3 --num-layers 4 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 8
  grep -h "iteration\s*[0-9]*/" "$OUT"/pretrain_*.log | head -n 3
fi

gpu_test() {  # log name, time limit, lines to show, then pytest's arguments
  local log="$OUT/$1.log" limit=$2 show=$3; shift 3
  timeout "$limit" python3 -m pytest "$@" -v -s -p no:cacheprovider >"$log" 2>&1
  local rc=$?
  grep -E "$show|PASSED|FAILED|SKIPPED|passed|failed" "$log" | tail -n 40
  [ $rc -eq 0 ] || fail "$1 failed (log: $log)"
}

if [ "$WHAT" = all ] || [ "$WHAT" = equality ]; then
  echo "== DeepSeek training equality on NCCL ($NGPU GPUs; t = 4 needs 4)"
  gpu_test equality_gpu 570 "max loss difference|least margin|planted" tests/test_megatron_deepseek.py -k gpu
fi

if [ "$WHAT" = all ] || [ "$WHAT" = distopt ]; then
  echo "== the distributed optimizer's checkpoint on NCCL: saved at tp 1 x dp 2, resumed at tp 2 x dp 1"
  gpu_test distopt_gpu 500 "Error|assert" tests/test_megatron_paths.py -k distributed_optimizer
fi
echo "megatron_pretrain_gpu: OK (logs in $OUT)" | tee -a "$OUT/summary.txt"
