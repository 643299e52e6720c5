#!/usr/bin/env bash
# bash script/eval/run_refomb_overall.sh --model-path checkpoints/RLAIF-V-7B \
#     --reference refomb-gpt4v \
#     --image-root data/refomb/images --out-dir outputs/refomb/rlaifv-7b --runs 3 \
#     --judge openai --judge-model gpt-4-1106-preview --prompt-file prompt-refomb-pairwise
#   (published files by name, once fetched: python -m utils.fetch NAME; see docs/DATA.md)
#
# RefoMB overall pass: the model answers the questions (3 beams, greedy), then the judge compares each answer
# (model B) with the GPT-4V reference (model A) given the hidden image description: [[A]]/[[B]]/[[C]],
# score = mean((s+1)/2), per type, averaged over --runs with their spread. Writes $OUT_DIR/overall/.
# Flags (--name value):
#   --model-path DIR  --lora-path DIR  --reference FILE  --image-root DIR (images, by image_url name)
#   --out-dir DIR  --runs N (default 1)
#   --judge openai|hf  --judge-model NAME|DIR  --base-url URL  --api-key-env VAR  --concurrency N  --judge-max-tokens N  --prompt-file FILE
#   --gpus N  --batch-size N  --max-new-tokens N  --skip-answer 1
#   --protocol paper|ours  paper (default): scored as the published scripts (docs/BENCHMARK_PARITY.md)
set -euo pipefail
source "$(dirname "$0")/_flags.sh"
parse_flags "protocol judge-max-tokens model-path lora-path reference image-root out-dir runs judge judge-model base-url api-key-env \
concurrency prompt-file gpus batch-size max-new-tokens skip-answer" "$@"
require REFERENCE OUT_DIR

run_answers refomb "$REFERENCE" "$OUT_DIR/answers.jsonl"
judge_args
python -m eval.refomb overall --answers "$OUT_DIR/answers.jsonl" --reference "$REFERENCE" --runs "${RUNS:-1}" \
    --out-dir "$OUT_DIR/overall" "${JUDGE_ARGS[@]}"
