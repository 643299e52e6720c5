#!/usr/bin/env bash
# bash script/eval/eval_amber.sh --model-path checkpoints/RLAIF-V-7B --data-dir AMBER/data \
#     --image-root data/amber/image --out-dir outputs/amber/rlaifv-7b
#
# AMBER (no judge): the model answers AMBER's queries (the family's chat decoding), then the generative scores
# (CHAIR, Cover, Hal, Cog) and the discriminative ones (accuracy, precision, recall, F1; "no" positive) per
# dimension, following the official scorer. Flags (all --name value):
#   --model-path DIR      checkpoint to evaluate (any family)      --lora-path DIR   LoRA adapter to merge
#   --data-dir DIR        AMBER's data/ folder (annotations.json, relation.json, safe_words.txt, query/)
#   --questions FILE      query file (default DATA_DIR/query/query_all.json; query_generative.json, ...)
#   --image-root DIR      AMBER's images (AMBER_<n>.jpg)
#   --out-dir DIR         answers.jsonl, samples.jsonl, results.json
#   --nlp auto|official|offline   word processing (official: NLTK data + spaCy en_core_web_lg; see docs/AMBER_POPE.md)
#   --yes-no pope|exact   discriminative answers read as POPE does (default) or only exact "Yes"/"No" (official)
#   --gpus N  --batch-size N  --max-new-tokens N  --skip-answer 1
set -euo pipefail
source "$(dirname "$0")/_flags.sh"
parse_flags "model-path lora-path data-dir questions image-root out-dir nlp yes-no gpus batch-size max-new-tokens \
skip-answer" "$@"
require DATA_DIR OUT_DIR

QUESTIONS="${QUESTIONS:-$DATA_DIR/query/query_all.json}"
run_answers amber "$QUESTIONS" "$OUT_DIR/answers.jsonl"
python -m eval.amber --answers "$OUT_DIR/answers.jsonl" --data-dir "$DATA_DIR" --out-dir "$OUT_DIR" \
    --nlp "${NLP:-auto}" --yes-no "${YES_NO:-pope}"
