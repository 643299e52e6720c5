#!/usr/bin/env bash
# RLAIF-V 12B self-feedback: OmniLMM 12B answers and labels its own answers (the released Llama-3-8B split and
# change-question models divide them into claims); no stronger labeler is needed.
#   bash script/data_gen/run_data_pipeline_self_feedback.sh [--work DIR] [--policy CKPT] [...]
# The labeler defaults to the policy (kept loaded between generate and autocheck). Defaults as
# run_data_pipeline_llava15_omni.sh with policy checkpoints/OmniLMM-12B, work dir work/omnilmm_self.
source "$(dirname "${BASH_SOURCE[0]}")/_data_gen_common.sh" "$@"
PROMPTS=${PROMPTS:-data/prompts/rlaifv_prompts.jsonl}      # ds_question_id, image_path|image, question, metainfos
IMAGE_ROOT=${IMAGE_ROOT:-.}                                # relative image_path values start here
POLICY=${POLICY:-checkpoints/OmniLMM-12B}
LABELER=${LABELER:-$POLICY}                                # self-feedback: the policy labels
SPLITTER=${SPLITTER:-checkpoints/llama3-8b-split}
CHANGEQ=${CHANGEQ:-checkpoints/llama3-8b-changeq}
SPLIT_PROMPT=${SPLIT_PROMPT-prompt-split-facts}            # empty: our prompt
CHANGEQ_PROMPT=${CHANGEQ_PROMPT-prompt-change-question}
WORK=${WORK:-work/omnilmm_self}
data_gen_pipeline
