#!/usr/bin/env bash
# Reward-ranked feedback (RLAIF-V's self-feedback reward, CVPR 2025 version): the policy samples answers, an aligned
# checkpoint and its reference reward them (beta * log-ratio, summed and averaged per token), and the released data
# engine's rules make the pairs; no labeler and no claims.
#   bash script/data_gen/run_data_pipeline_reward.sh [--work DIR] [--reward-model CKPT] [--reward-reference CKPT]
# --top-k N / --max-word-gap N: the engine's pair rules. Defaults: policy checkpoints/llava-v1.5-7b, reward model
# checkpoints/RLAIF-V-7B aligned from checkpoints/llava-v1.5-7b, work dir work/reward_feedback.
source "$(dirname "${BASH_SOURCE[0]}")/_data_gen_common.sh" "$@"
FEEDBACK=reward
PROMPTS=${PROMPTS:-data/prompts/rlaifv_prompts.jsonl}      # ds_question_id, image_path|image, question, metainfos
IMAGE_ROOT=${IMAGE_ROOT:-.}
POLICY=${POLICY:-checkpoints/llava-v1.5-7b}
REWARD_MODEL=${REWARD_MODEL:-checkpoints/RLAIF-V-7B}        # the aligned model
REWARD_REFERENCE=${REWARD_REFERENCE:-checkpoints/llava-v1.5-7b}  # the checkpoint it was aligned from
WORK=${WORK:-work/reward_feedback}
data_gen_pipeline
