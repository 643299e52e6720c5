#!/usr/bin/env bash
# Shared launcher of the script/train/*_train*.sh wrappers (sourced, not run): parses the named flags, runs the
# reference log-probs stage, then DPO training. The wrapper sets DEFAULT_DS_CONFIG and DEFAULT_ARGS first.
#   --model_path DIR  --data DIR|FILE|HUB_ID  --output_dir DIR  [--image_root DIR]  [--gpus N]  [--cpu]
#   [--deepspeed JSON|none]  [--launcher torchrun|deepspeed|accelerate|python]
# --image_root: where the relative image paths of a pipeline pair JSONL live (the pipeline's --image-root).
# --cpu (the default when no GPU is visible): float32, no DeepSpeed unless --deepspeed is given, no loader workers,
# one process unless --gpus N: a dry run of the recipe. --overwrite True starts training and the reference cache over. Any other flag (e.g. --max_steps 2 --learning_rate 1e-6 --use_lora True)
# goes to muffin.train.train_dpo and overrides the wrapper's defaults (later flags win). On failure the last lines
# printed are the real error and the log that holds the rest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MODEL_PATH=""; DATA=""; OUTPUT_DIR=""; IMAGE_ROOT=""; DS_CONFIG=""; LAUNCHER=""; CPU=0; GPUS_ASKED=""; EXTRA=()
GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
[[ "$GPUS" -ge 1 ]] || { GPUS=1; CPU=1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model_path|--data|--output_dir|--image_root|--gpus|--deepspeed|--launcher)
      [[ $# -ge 2 ]] || { echo "error: $1 needs a value (see $0 --help)" >&2; exit 2; } ;;&
    --model_path) MODEL_PATH="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --output_dir) OUTPUT_DIR="$2"; shift 2 ;;
    --image_root) IMAGE_ROOT="$2"; shift 2 ;;
    --gpus) GPUS="$2"; GPUS_ASKED="$2"; shift 2 ;;
    --deepspeed) DS_CONFIG="$2"; shift 2 ;;
    --launcher) LAUNCHER="$2"; shift 2 ;;
    --cpu) CPU=1; shift ;;
    -h|--help) grep '^#' "$0" | tail -n +2; grep '^#' "$REPO/script/train/_dpo_common.sh" | sed -n '4,10p'; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
if [[ -z "$MODEL_PATH" || -z "$DATA" || -z "$OUTPUT_DIR" ]]; then
  echo "error: --model_path, --data and --output_dir are required (see $0 --help)" >&2; exit 2
fi
if [[ "$CPU" == 1 ]]; then
  GPUS="${GPUS_ASKED:-1}"  # --gpus N on the CPU: N processes (gloo), e.g. to try DeepSpeed's data parallelism
  if [[ "$GPUS" == 1 ]]; then LAUNCHER="${LAUNCHER:-python}"; else LAUNCHER="${LAUNCHER:-torchrun}"; fi
  DS_CONFIG="${DS_CONFIG:-none}"
  PRECISION=(--use_cpu True --bf16 False --tf32 False --dataloader_num_workers 0)
else
  LAUNCHER="${LAUNCHER:-torchrun}"; DS_CONFIG="${DS_CONFIG:-$REPO/${DEFAULT_DS_CONFIG:-script/zero2.json}}"
  PRECISION=(--bf16 True --tf32 True --dataloader_num_workers 8)
fi
DS_ARGS=(); [[ "$DS_CONFIG" == none ]] || DS_ARGS=(--deepspeed "$DS_CONFIG")
case "$LAUNCHER" in
  torchrun) RUN=(torchrun --nproc_per_node "$GPUS" -m) ;;
  deepspeed) RUN=(deepspeed --num_gpus "$GPUS" --module) ;;
  accelerate) RUN=(accelerate launch --num_processes "$GPUS" -m) ;;
  python) [[ "$GPUS" == 1 ]] || { echo "error: --launcher python runs one process; use torchrun for --gpus $GPUS" >&2; exit 2; }
    RUN=(python -m) ;;
  *) echo "error: --launcher must be torchrun, deepspeed, accelerate or python, got '$LAUNCHER'" >&2; exit 2 ;;
esac
REF_RUN=(torchrun --nproc_per_node "$GPUS" -m); [[ "$GPUS" == 1 ]] && REF_RUN=(python -m)
if [[ "$GPUS" == 1 && "$LAUNCHER" != torchrun && "$LAUNCHER" != deepspeed ]]; then
  # one process without a launcher's rendezvous: DeepSpeed would look for MPI; give it a one-process group
  export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
  export MASTER_PORT="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}"
fi
IMAGE_ARGS=(); [[ -z "$IMAGE_ROOT" ]] || IMAGE_ARGS=(--image_root "$IMAGE_ROOT")
# flags the reference stage must share with training
REF_ARGS=(--model_max_length 2048)
for ((i = 0; i + 1 < ${#EXTRA[@]}; i++)); do
  case "${EXTRA[$i]}" in
    --model_max_length|--logps_dir|--family|--data_split|--compile_layers) REF_ARGS+=("${EXTRA[$i]}" "${EXTRA[$((i + 1))]}") ;;
    --overwrite) [[ "${EXTRA[$((i + 1))]}" =~ ^([Tt]rue|1)$ ]] && REF_ARGS+=(--overwrite) ;;  # start both over
  esac
done
mkdir -p "$OUTPUT_DIR"
LOG="$OUTPUT_DIR/launch.log"; : > "$LOG"

# Run a step with its output shown and kept in $LOG; on failure, end with the child's own error line (a launcher's
# ChildFailedError buries it tens of lines up) and where the whole output is.
run_step() {
  local name="$1"; shift
  local rc=0
  "$@" > >(tee -a "$LOG") 2> >(tee -a "$LOG" >&2) || rc=$?
  wait
  if [[ "$rc" != 0 ]]; then
    local first
    first="$(grep -m1 -E '^(error: |[A-Za-z_.]*(Error|Exception): )' "$LOG" | grep -v -E 'ChildFailedError|CalledProcessError' || true)"
    echo "" >&2
    echo "error: the $name step failed (exit $rc): ${first:-see the output above}" >&2
    echo "       full output: $LOG" >&2
    exit "$rc"
  fi
}

# 1) reference log-probs of the initial model (reused when its fingerprint matches; needed before ZeRO-3 training)
run_step reference "${REF_RUN[@]}" muffin.train.reference --model_path "$MODEL_PATH" --data "$DATA" \
  --batch_size "${REFERENCE_BATCH_SIZE:-8}" "${IMAGE_ARGS[@]}" "${REF_ARGS[@]}"

# 2) DPO (resumes from the last complete checkpoint in --output_dir)
run_step training "${RUN[@]}" muffin.train.train_dpo --model_path "$MODEL_PATH" --data "$DATA" \
  --output_dir "$OUTPUT_DIR" "${IMAGE_ARGS[@]}" "${DS_ARGS[@]}" "${PRECISION[@]}" --gradient_checkpointing True \
  --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --max_steps 2672 \
  --save_strategy steps --save_steps 167 --lr_scheduler_type cosine --warmup_steps 0.05 --weight_decay 0.01 \
  --model_max_length 2048 --beta 0.1 --logging_steps 1 --report_to none \
  "${DEFAULT_ARGS[@]}" "${EXTRA[@]}"
