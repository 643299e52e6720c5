#!/usr/bin/env bash
# bash script/data_gen/run_data_pipeline_llava15_minicpmv.sh
# LLaVA 1.5 7B answers, MiniCPM-Llama3-V 2.5 labels (divide with the released Llama-3-8B split and
# changeq models). Every stage resumes: rerun this script after a crash. Override any variable from the environment.
# The labeler loads into this project's implementation (no code from the checkpoint runs); TRUST_REMOTE_CODE=1 runs
# the checkpoint's own Python code instead. SPLITTER=rule CHANGEQ=rule need no text models; an empty SPLIT_PROMPT /
# CHANGEQ_PROMPT uses our prompt. CPU smoke run on tiny models: tests/test_minicpmv_script.py.
set -euo pipefail

PROMPTS=${PROMPTS:-data/prompts/rlaifv_prompts.jsonl}      # ds_question_id, image_path|image, question, metainfos
IMAGE_ROOT=${IMAGE_ROOT:-.}                                # relative image_path values start here
POLICY=${POLICY:-checkpoints/llava-v1.5-7b}
LABELER=${LABELER:-checkpoints/MiniCPM-Llama3-V-2_5}
SPLITTER=${SPLITTER:-checkpoints/llama3-8b-split}          # or: rule
CHANGEQ=${CHANGEQ:-checkpoints/llama3-8b-changeq}          # or: rule
SPLIT_PROMPT=${SPLIT_PROMPT-prompt-split-facts}        # the released split model's prompt (python -m utils.fetch prompt-split-facts)
CHANGEQ_PROMPT=${CHANGEQ_PROMPT-prompt-change-question}  # python -m utils.fetch prompt-change-question
WORK=${WORK:-work/llava15_minicpmv}
NGPU=${NGPU:-$({ nvidia-smi -L 2>/dev/null || true; } | wc -l)}; [ "$NGPU" -gt 0 ] || NGPU=1  # no nvidia-smi: 1 (CPU)
NUM_SAMPLES=${NUM_SAMPLES:-10}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}
GEN_BATCH=${GEN_BATCH:-8}    # answers per generate batch; on an 80 GB GPU 80 (8 prompts x 10, ~47 GiB of KV cache for 7B)
SEED=${SEED:-0}
QUESTION_TYPE=${QUESTION_TYPE:-detailed_description}
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-0}
RUN="torchrun --standalone --nproc_per_node=$NGPU"

LABELER_ARGS=(); [ "$TRUST_REMOTE_CODE" = 1 ] && LABELER_ARGS+=(--trust-remote-code)
source "$(dirname "${BASH_SOURCE[0]}")/_stage_args.sh"  # each stage's model arguments and launcher

mkdir -p "$WORK"
$GEN_RUN -m muffin.feedback.generate --prompts "$PROMPTS" --image-root "$IMAGE_ROOT" "${POLICY_ARGS[@]}" \
    --out "$WORK/answers.jsonl" --num-samples "$NUM_SAMPLES" --temperature 0.7 --max-new-tokens "$MAX_NEW_TOKENS" \
    --seed "$SEED" --batch-size "$GEN_BATCH"
$SPLIT_RUN -m muffin.feedback.divide --answers "$WORK/answers.jsonl" --out "$WORK/claims.jsonl" \
    --splitter "$SPLITTER" "${SPLIT_ARGS[@]}"
$CHANGEQ_RUN -m muffin.feedback.changeq --claims "$WORK/claims.jsonl" --out "$WORK/questions.jsonl" \
    --changeq "$CHANGEQ" "${CHANGEQ_ARGS[@]}"
$CHECK_RUN -m muffin.feedback.autocheck --questions "$WORK/questions.jsonl" --prompts "$PROMPTS" --image-root "$IMAGE_ROOT" \
    "${LABELER_ARGS_SRV[@]}" --out "$WORK/checked.jsonl" "${LABELER_ARGS[@]}"
python -m muffin.feedback.pairs --checked "$WORK/checked.jsonl" --out "$WORK/pairs.jsonl" --max-pairs 2 --seed "$SEED"
python -m muffin.feedback.balance --pairs "$WORK/pairs.jsonl" --out "$WORK/balanced.jsonl"
python -m muffin.feedback.export --pairs "$WORK/balanced.jsonl" --prompts "$PROMPTS" --image-root "$IMAGE_ROOT" \
    --out "$WORK/dataset.parquet" --question-type "$QUESTION_TYPE"
python -m muffin.feedback.report --checked "$WORK/checked.jsonl" --pairs "$WORK/pairs.jsonl" \
    --balanced "$WORK/balanced.jsonl" --out-dir "$WORK/report"
