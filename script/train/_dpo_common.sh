#!/usr/bin/env bash
# Shared launcher of the script/train/*_train*.sh wrappers (sourced, not run): parses the named flags, runs the
# reference log-probs stage on every GPU, then DPO training. The wrapper sets the DEFAULT_* variables first.
#   --model_path DIR  --data DIR|FILE|HUB_ID  --output_dir DIR  [--gpus N]  [--deepspeed JSON]  [--launcher torchrun|deepspeed|accelerate]
# Any other flag (e.g. --learning_rate 1e-6 --report_to wandb|tensorboard --use_lora True) goes to muffin.train.train_dpo and
# overrides the wrapper's defaults (later flags win).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MODEL_PATH="${DEFAULT_MODEL_PATH:-}"; DATA="${DEFAULT_DATA:-}"; OUTPUT_DIR="${DEFAULT_OUTPUT_DIR:-}"
GPUS="$( (nvidia-smi -L 2>/dev/null || true) | wc -l)"; [[ "$GPUS" -ge 1 ]] || GPUS=1
DS_CONFIG="$REPO/${DEFAULT_DS_CONFIG:-script/zero2.json}"; LAUNCHER=torchrun; EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model_path) MODEL_PATH="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --output_dir) OUTPUT_DIR="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --deepspeed) DS_CONFIG="$2"; shift 2 ;;
    --launcher) LAUNCHER="$2"; shift 2 ;;
    -h|--help) grep '^#' "$0" | tail -n +2; grep '^#' "$REPO/script/train/_dpo_common.sh" | sed -n '4,6p'; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
if [[ -z "$MODEL_PATH" || -z "$DATA" || -z "$OUTPUT_DIR" ]]; then
  echo "error: --model_path, --data and --output_dir are required (see $0 --help)" >&2; exit 2
fi
case "$LAUNCHER" in
  torchrun) RUN=(torchrun --nproc_per_node "$GPUS" -m) ;;
  deepspeed) RUN=(deepspeed --num_gpus "$GPUS" --module) ;;
  accelerate) RUN=(accelerate launch --num_processes "$GPUS" -m) ;;
  *) echo "error: --launcher must be torchrun, deepspeed or accelerate, got '$LAUNCHER'" >&2; exit 2 ;;
esac
# flags the reference stage must share with training
REF_ARGS=(--model_max_length 2048)
for ((i = 0; i + 1 < ${#EXTRA[@]}; i++)); do
  case "${EXTRA[$i]}" in
    --model_max_length|--logps_dir|--image_root|--family|--data_split) REF_ARGS+=("${EXTRA[$i]}" "${EXTRA[$((i + 1))]}") ;;
  esac
done

# 1) reference log-probs of the initial model (reused when its fingerprint matches; needed before ZeRO-3 training)
torchrun --nproc_per_node "$GPUS" -m muffin.train.reference --model_path "$MODEL_PATH" --data "$DATA" \
  --batch_size "${REFERENCE_BATCH_SIZE:-8}" "${REF_ARGS[@]}"

# 2) DPO (resumes from the last checkpoint in --output_dir)
"${RUN[@]}" muffin.train.train_dpo --model_path "$MODEL_PATH" --data "$DATA" --output_dir "$OUTPUT_DIR" \
  --deepspeed "$DS_CONFIG" --bf16 True --tf32 True --gradient_checkpointing True \
  --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --max_steps 2672 \
  --save_strategy steps --save_steps 167 --lr_scheduler_type cosine --warmup_steps 0.05 --weight_decay 0.01 \
  --model_max_length 2048 --beta 0.1 --logging_steps 1 --report_to none --dataloader_num_workers 8 \
  "${DEFAULT_ARGS[@]}" "${EXTRA[@]}"
