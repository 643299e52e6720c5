#!/usr/bin/env bash
# bash script/data_gen/run_data_pipeline_cpu_tiny.sh [WORK=/tmp/rlaifv_cpu_tiny]
# CPU dry run of the whole feedback pipeline, from a clone with nothing beside it: a tiny random LLaVA (policy and
# its own labeler), the rule-based divide and change-question backends, and 30 prompts on images of a small synthetic
# world that this script draws first. It checks the wiring; the model is random, so the data is noise.
# Env: PROMPTS / IMAGE_ROOT to run on your own prompts instead (the original's JSONL format), TINY for the model,
# NUM_SAMPLES (3), MAX_NEW_TOKENS (16), THREADS (torch threads, 2).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${THREADS:-2}" MKL_NUM_THREADS="${THREADS:-2}"
WORK="${1:-${WORK:-/tmp/rlaifv_cpu_tiny}}"
TINY="${TINY:-$WORK/tiny-llava}"
if [[ -z "${PROMPTS:-}" ]]; then
  WORLD="$WORK/world"
  if [[ ! -f "$WORLD/feedback/prompts.jsonl" ]]; then
    python -m muffin.world.build --out "$WORLD" --seed 0 --n-sft 0 --n-feedback 30 --n-val 0 --n-test 0
  fi
  PROMPTS="$WORLD/feedback/prompts.jsonl"; IMAGE_ROOT="$WORLD"
fi
[[ -f "$TINY/config.json" ]] || python -m utils.tiny_models llava "$TINY"
python -m muffin.feedback.pipeline --prompts "$PROMPTS" --image-root "${IMAGE_ROOT:?set IMAGE_ROOT with PROMPTS}" \
  --policy "$TINY" --work-dir "$WORK/data" --num-samples "${NUM_SAMPLES:-3}" --max-new-tokens "${MAX_NEW_TOKENS:-16}" \
  --splitter rule --changeq rule --device cpu
echo "dry run done: $WORK/data/dataset.parquet (train on it with script/train/*.sh --data), report in $WORK/data/report"
