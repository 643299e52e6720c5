#!/usr/bin/env bash
# bash script/eval/run_refomb_hall.sh --out-dir outputs/refomb/rlaifv-7b \
#     --judge openai --judge-model gpt-4-1106-preview \
#     --prompt-file prompt-refomb-hallucination
#   (published files by name, once fetched: python -m utils.fetch NAME; see docs/DATA.md)
#
# RefoMB hallucination pass over the reviews of run_refomb_overall.sh ($OUT_DIR/overall/samples.jsonl): the
# judge decides which answer each review found less hallucinated; trustworthiness = mean((s+1)/2), per type and
# run. Writes $OUT_DIR/hall/. Flags (--name value):
#   --out-dir DIR  (as given to run_refomb_overall.sh)   --reviews FILE (default $OUT_DIR/overall/samples.jsonl)
#   --judge openai|hf  --judge-model NAME|DIR  --base-url URL  --api-key-env VAR  --concurrency N  --judge-max-tokens N  --prompt-file FILE
#   --protocol paper|ours  paper (default): scored as the published scripts (docs/BENCHMARK_PARITY.md)
set -euo pipefail
source "$(dirname "$0")/_flags.sh"
parse_flags "protocol judge-max-tokens out-dir reviews judge judge-model base-url api-key-env concurrency prompt-file" "$@"
require OUT_DIR

judge_args
python -m eval.refomb hall --reviews "${REVIEWS:-$OUT_DIR/overall/samples.jsonl}" --out-dir "$OUT_DIR/hall" \
    "${JUDGE_ARGS[@]}"
