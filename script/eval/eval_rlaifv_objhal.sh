#!/usr/bin/env bash
# bash script/eval/eval_rlaifv_objhal.sh --model-path checkpoints/RLAIF-V-7B \
#     --questions data/objhal/obj_halbench_300_with_image.jsonl --coco-dir data/coco2014/annotations \
#     --out-dir outputs/objhal/rlaifv-7b --judge openai --judge-model gpt-4o-2024-08-06
#
# Object HalBench: the model describes the 300 COCO images (3 beams, greedy, <= 1024 tokens), then CHAIR against
# COCO 2014 instances + captions. Flags (all --name value):
#   --model-path DIR      checkpoint to evaluate (any family)      --lora-path DIR   LoRA adapter to merge
#   --questions FILE      prompts: image_id, question, image (base64/path) or images under --image-root
#   --image-root DIR      COCO images (COCO_val2014_<id>.jpg)      --coco-dir DIR    instances/captions_*2014.json
#   --out-dir DIR         answers.jsonl, samples.jsonl, results.json
#   --extractor judge|rule   objects listed by the judge (published protocol, default) or by offline matching
#   --judge openai|hf  --judge-model NAME|DIR  --base-url URL  --api-key-env VAR  --concurrency N  --judge-max-tokens N
#   --prompt-file FILE    extraction prompt (published: prompt-objhal-extraction)
#   --synonyms FILE       synonym table (paper: the published one, python -m utils.fetch objhal-synonyms)
#   --gpus N  --batch-size N  --max-new-tokens N  --skip-answer 1
#   --protocol paper|ours  paper (default): scored as the published scripts (docs/BENCHMARK_PARITY.md)
set -euo pipefail
source "$(dirname "$0")/_flags.sh"
parse_flags "protocol judge-max-tokens model-path lora-path questions image-root coco-dir out-dir extractor judge judge-model base-url \
api-key-env concurrency prompt-file synonyms gpus batch-size max-new-tokens skip-answer" "$@"
require QUESTIONS COCO_DIR OUT_DIR

run_answers objhal "$QUESTIONS" "$OUT_DIR/answers.jsonl"
judge_args
SYN=(); [ -n "${SYNONYMS:-}" ] && SYN=(--synonyms "$SYNONYMS")
python -m eval.objhal --answers "$OUT_DIR/answers.jsonl" --extractor "${EXTRACTOR:-judge}" \
    --annotations "$COCO_DIR/instances_val2014.json" "$COCO_DIR/instances_train2014.json" \
    --captions "$COCO_DIR/captions_val2014.json" "$COCO_DIR/captions_train2014.json" \
    --out-dir "$OUT_DIR" "${SYN[@]}" "${JUDGE_ARGS[@]}"
