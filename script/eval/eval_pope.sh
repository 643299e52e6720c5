#!/usr/bin/env bash
# bash script/eval/eval_pope.sh --model-path checkpoints/RLAIF-V-7B --questions data/pope/coco \
#     --image-root data/coco2014/val2014 --out-dir outputs/pope/rlaifv-7b
#
# POPE (no judge): the model answers the yes/no object questions of the random, popular and adversarial splits
# (the family's chat decoding), then accuracy / precision / recall / F1 / yes-ratio per split with POPE's published
# yes/no reading of free-form answers. Flags (all --name value):
#   --model-path DIR      checkpoint to evaluate (any family)      --lora-path DIR   LoRA adapter to merge
#   --questions PATH      a folder of coco_pope_<split>.json files (all splits) or one such file
#   --image-root DIR      COCO val2014 images (COCO_val2014_<12-digit id>.jpg)
#   --out-dir DIR         answers.jsonl, samples.jsonl, results.json
#   --gpus N  --batch-size N  --max-new-tokens N  --skip-answer 1
set -euo pipefail
source "$(dirname "$0")/_flags.sh"
parse_flags "model-path lora-path questions image-root out-dir gpus batch-size max-new-tokens skip-answer" "$@"
require QUESTIONS OUT_DIR

run_answers pope "$QUESTIONS" "$OUT_DIR/answers.jsonl"
python -m eval.pope --answers "$OUT_DIR/answers.jsonl" --questions "$QUESTIONS" --out-dir "$OUT_DIR"
