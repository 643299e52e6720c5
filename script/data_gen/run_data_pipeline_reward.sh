#!/usr/bin/env bash
# bash script/data_gen/run_data_pipeline_reward.sh
# Reward-ranked feedback (RLAIF-V's self-feedback reward, CVPR 2025 version): the policy samples answers, an aligned
# checkpoint and its reference reward them (beta * log-ratio, summed and averaged per token), and the released data
# engine's rules make the pairs; then balance and export as the divide-and-conquer scripts do. Every stage resumes:
# rerun after a crash. Override any variable from the environment.
set -euo pipefail

PROMPTS=${PROMPTS:-data/prompts/rlaifv_prompts.jsonl}      # ds_question_id, image_path|image, question, metainfos
IMAGE_ROOT=${IMAGE_ROOT:-.}
POLICY=${POLICY:-checkpoints/llava-v1.5-7b}
REWARD_MODEL=${REWARD_MODEL:-checkpoints/RLAIF-V-7B}        # the aligned model
REWARD_REFERENCE=${REWARD_REFERENCE:-checkpoints/llava-v1.5-7b}  # the checkpoint it was aligned from
WORK=${WORK:-work/reward_feedback}
NGPU=${NGPU:-$({ nvidia-smi -L 2>/dev/null || true; } | wc -l)}; [ "$NGPU" -gt 0 ] || NGPU=1  # no nvidia-smi: 1 (CPU)
NUM_SAMPLES=${NUM_SAMPLES:-10}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}
GEN_BATCH=${GEN_BATCH:-8}
SEED=${SEED:-0}
TOP_K=${TOP_K:-3}; MAX_WORD_GAP=${MAX_WORD_GAP:-25}
QUESTION_TYPE=${QUESTION_TYPE:-detailed_description}
RUN="torchrun --standalone --nproc_per_node=$NGPU"; [ "$NGPU" -gt 1 ] || RUN=python

# served models instead of checkpoints (docs/SERVING.md): POLICY_SERVER = base URLs
# (comma-separated); a served stage runs as one process
POLICY_ARGS=(--policy "$POLICY"); GEN_RUN=$RUN
[ -n "${POLICY_SERVER:-}" ] && { POLICY_ARGS=(--policy-server "$POLICY_SERVER"); GEN_RUN=python; }

mkdir -p "$WORK"
$GEN_RUN -m muffin.feedback.generate --prompts "$PROMPTS" --image-root "$IMAGE_ROOT" "${POLICY_ARGS[@]}" \
    --out "$WORK/answers.jsonl" --num-samples "$NUM_SAMPLES" --temperature 0.7 --max-new-tokens "$MAX_NEW_TOKENS" \
    --seed "$SEED" --batch-size "$GEN_BATCH"
$RUN -m muffin.feedback.reward_feedback --answers "$WORK/answers.jsonl" --prompts "$PROMPTS" --image-root "$IMAGE_ROOT" \
    --reward-model "$REWARD_MODEL" --reward-reference "$REWARD_REFERENCE" --out "$WORK/rewarded.jsonl" \
    --pairs-out "$WORK/pairs.jsonl" --seed "$SEED" --top-k "$TOP_K" --max-word-gap "$MAX_WORD_GAP"
python -m muffin.feedback.balance --pairs "$WORK/pairs.jsonl" --out "$WORK/balanced.jsonl"
python -m muffin.feedback.export --pairs "$WORK/balanced.jsonl" --prompts "$PROMPTS" --image-root "$IMAGE_ROOT" \
    --out "$WORK/dataset.parquet" --question-type "$QUESTION_TYPE"
echo "reward-ranked data: $WORK/dataset.parquet"
