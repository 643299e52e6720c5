#!/usr/bin/env bash
# RLAIF-V 7B feedback data: LLaVA 1.5 7B answers, OmniLMM 12B labels, the released Llama-3-8B split and
# change-question models divide the answers into claims (the paper's setting).
#   bash script/data_gen/run_data_pipeline_llava15_omni.sh [--work DIR] [--policy CKPT] [--labeler CKPT] [...]
# Defaults: prompts data/prompts/rlaifv_prompts.jsonl, policy checkpoints/llava-v1.5-7b, labeler
# checkpoints/OmniLMM-12B, splitter / changeq checkpoints/llama3-8b-{split,changeq} with their released prompts
# (python -m utils.fetch prompt-split-facts prompt-change-question; --splitter rule --changeq rule need none),
# work dir work/llava15_omni. Output: WORK/dataset.parquet for script/train/*.sh --data, a report in WORK/report.
source "$(dirname "${BASH_SOURCE[0]}")/_data_gen_common.sh" "$@"
PROMPTS=${PROMPTS:-data/prompts/rlaifv_prompts.jsonl}      # ds_question_id, image_path|image, question, metainfos
IMAGE_ROOT=${IMAGE_ROOT:-.}                                # relative image_path values start here
POLICY=${POLICY:-checkpoints/llava-v1.5-7b}
LABELER=${LABELER:-checkpoints/OmniLMM-12B}
SPLITTER=${SPLITTER:-checkpoints/llama3-8b-split}
CHANGEQ=${CHANGEQ:-checkpoints/llama3-8b-changeq}
SPLIT_PROMPT=${SPLIT_PROMPT-prompt-split-facts}            # empty: our prompt
CHANGEQ_PROMPT=${CHANGEQ_PROMPT-prompt-change-question}
WORK=${WORK:-work/llava15_omni}
data_gen_pipeline
