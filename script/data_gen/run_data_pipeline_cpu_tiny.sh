#!/usr/bin/env bash
# CPU dry run of the whole feedback pipeline, from a clone with nothing beside it: a tiny random LLaVA (policy and
# its own labeler), the rule-based divide and change-question backends, and 30 prompts on images of a small
# synthetic world that this script draws first. It checks the wiring; the model is random, so the data is noise.
#   bash script/data_gen/run_data_pipeline_cpu_tiny.sh [WORK=/tmp/rlaifv_cpu_tiny] [--num-samples N] [...]
# --prompts / --image-root run it on your own prompts instead (the original's JSONL format); TINY: the model dir;
# THREADS: torch threads (2).
source "$(dirname "${BASH_SOURCE[0]}")/_data_gen_common.sh" "$@"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${THREADS:-2}" MKL_NUM_THREADS="${THREADS:-2}"
ROOT="${WORK:-/tmp/rlaifv_cpu_tiny}"
TINY="${TINY:-$ROOT/tiny-llava}"
BUILD=(); [[ "${DRY_RUN:-0}" == 1 ]] && BUILD=(echo)  # --dry-run: say what would be built
if [[ -z "${PROMPTS:-}" ]]; then
  WORLD="$ROOT/world"
  if [[ ! -f "$WORLD/feedback/prompts.jsonl" ]]; then
    "${BUILD[@]}" python -m muffin.world.build --out "$WORLD" --seed 0 --n-sft 0 --n-feedback 30 --n-val 0 --n-test 0
  fi
  PROMPTS="$WORLD/feedback/prompts.jsonl"; IMAGE_ROOT="$WORLD"
fi
[[ -f "$TINY/config.json" ]] || "${BUILD[@]}" python -m utils.tiny_models llava "$TINY"
POLICY="$TINY"; WORK="$ROOT/data"; NGPU=1
NUM_SAMPLES=${NUM_SAMPLES:-3}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}; SPLITTER=rule; CHANGEQ=rule
EXTRA+=(--device cpu)
data_gen_pipeline
[[ "${DRY_RUN:-0}" == 1 ]] || echo "dry run done: $WORK/dataset.parquet (train on it with script/train/*.sh --data), report in $WORK/report"
