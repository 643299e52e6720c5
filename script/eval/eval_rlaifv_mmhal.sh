#!/usr/bin/env bash
# bash script/eval/eval_rlaifv_mmhal.sh --model-path checkpoints/RLAIF-V-7B \
#     --template mmhal-template \
#     --image-root data/mmhal/images --out-dir outputs/mmhal/rlaifv-7b --judge openai --judge-model gpt-4-0314 \
#     --prompt-file prompt-mmhal-judge
#   (published files by name, once fetched: python -m utils.fetch NAME; see docs/DATA.md)
#
# MMHal-Bench: the model answers the 96 questions (3 beams, greedy, <= 1024 tokens), then a text-only judge rates
# each answer 0-6 (score = mean; hallucination rate = share below 3; per question type). Flags (--name value):
#   --model-path DIR  --lora-path DIR  --template FILE (the 96 items)  --image-root DIR (images, by image_src name)
#   --out-dir DIR     answers.jsonl, samples.jsonl, results.json
#   --judge openai|hf  --judge-model NAME|DIR  --base-url URL  --api-key-env VAR  --concurrency N  --judge-max-tokens N  --prompt-file FILE
#   --unparsed exclude|zero   --protocol ours only: unparseable ratings left out (default) or counted 0
#   --gpus N  --batch-size N  --max-new-tokens N  --skip-answer 1
#   --protocol paper|ours  paper (default): scored as the published scripts (docs/BENCHMARK_PARITY.md)
set -euo pipefail
source "$(dirname "$0")/_flags.sh"
parse_flags "protocol judge-max-tokens model-path lora-path template image-root out-dir judge judge-model base-url api-key-env concurrency \
prompt-file unparsed gpus batch-size max-new-tokens skip-answer" "$@"
require TEMPLATE OUT_DIR

run_answers mmhal "$TEMPLATE" "$OUT_DIR/answers.jsonl"
judge_args
python -m eval.mmhal --answers "$OUT_DIR/answers.jsonl" --template "$TEMPLATE" --unparsed "${UNPARSED:-exclude}" \
    --out-dir "$OUT_DIR" "${JUDGE_ARGS[@]}"
