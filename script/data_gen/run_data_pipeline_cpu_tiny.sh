#!/usr/bin/env bash
# bash script/data_gen/run_data_pipeline_cpu_tiny.sh
# CPU dry run of the whole pipeline with a tiny random LLaVA (policy and labeler) and the rule-based divide/changeq,
# over the 30 example prompts of the original release. Checks the wiring in about a minute; the data is noise.
set -euo pipefail

REFERENCE=${REFERENCE:-../shared/reference/data/rlaifv-original}   # holds examples/detail_test_30_input.jsonl
WORK=${WORK:-/tmp/rlaifv_cpu_tiny}
TINY=${TINY:-$WORK/tiny-llava}

export HF_HUB_OFFLINE=1
[ -f "$TINY/config.json" ] || python -m utils.tiny_models llava "$TINY"
python -m muffin.feedback.pipeline --prompts "$REFERENCE/examples/detail_test_30_input.jsonl" \
    --image-root "$REFERENCE" --policy "$TINY" --work-dir "$WORK/data" --num-samples 3 --max-new-tokens 16 \
    --splitter rule --changeq rule --device cpu
