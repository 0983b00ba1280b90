#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): every check in its own process, results as JSON lines.
#   bash scripts/gpu_check.sh [OUT_DIR]          # on a machine with one CUDA GPU
#   TINY=1 bash scripts/gpu_check.sh /tmp/out     # the same code paths on the CPU, tiny model
#   DEVICES=2 bash scripts/gpu_check.sh           # the *_fsdp2_* checks sharded over 2 GPUs
set -u
OUT=${1:-gpu_check_out}
ROOT=${ROOT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
STEPS=${STEPS:-8}
FLAGS=""
[ -n "${TINY:-}" ] && FLAGS="--tiny"
CHECKS=${CHECKS:-"sft_bf16 sft_lora_bf16 sft_lora_true reward_lora_bf16 dpo_bf16 dpo_lora_bf16 ppo_lora_bf16 grpo_bf16 grpo_ourloop_bf16 sft_fsdp2_bf16 reward_fsdp2_bf16 dpo_fsdp2_bf16 dpo_lora_fsdp2_bf16 ppo_fsdp2_bf16 ppo_lora_fsdp2_bf16 grpo_fsdp2_bf16"}
ERR=${ERR_DIR:-$OUT}  # each check's stderr
mkdir -p "$OUT" "$ERR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
[ -n "${TINY:-}" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, lightning, transformers, peft; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
$PY scripts/gpu_check.py prepare --root "$ROOT" $FLAGS || exit 1
for check in $CHECKS; do
  echo "=== $check"
  timeout "${CHECK_TIMEOUT:-240}" $PY scripts/gpu_check.py run --root "$ROOT" --check "$check" --steps "$STEPS" \
    --json "$OUT/gpu_check.jsonl" --devices "${DEVICES:-1}" $FLAGS 2>"$ERR/$check.err" | tail -1
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "    exit $rc; last lines of $ERR/$check.err:"; tail -8 "$ERR/$check.err"; }
done
