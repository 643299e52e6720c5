#!/usr/bin/env bash
# LLaVA 1.5 7B answers, MiniCPM-Llama3-V 2.5 labels (the released Llama-3-8B split and change-question models
# divide the answers into claims): the RLAIF-V recipe with an openly licensed labeler.
#   bash script/data_gen/run_data_pipeline_llava15_minicpmv.sh [--work DIR] [--labeler CKPT] [--trust-remote-code]
# The labeler loads into this project's implementation (no code from the checkpoint runs); --trust-remote-code (or
# TRUST_REMOTE_CODE=1) runs the checkpoint's own Python code instead. Defaults as run_data_pipeline_llava15_omni.sh
# with labeler checkpoints/MiniCPM-Llama3-V-2_5, work dir work/llava15_minicpmv. CPU smoke run on tiny models:
# tests/test_minicpmv_script.py.
source "$(dirname "${BASH_SOURCE[0]}")/_data_gen_common.sh" "$@"
PROMPTS=${PROMPTS:-data/prompts/rlaifv_prompts.jsonl}      # ds_question_id, image_path|image, question, metainfos
IMAGE_ROOT=${IMAGE_ROOT:-.}                                # relative image_path values start here
POLICY=${POLICY:-checkpoints/llava-v1.5-7b}
LABELER=${LABELER:-checkpoints/MiniCPM-Llama3-V-2_5}
SPLITTER=${SPLITTER:-checkpoints/llama3-8b-split}
CHANGEQ=${CHANGEQ:-checkpoints/llama3-8b-changeq}
SPLIT_PROMPT=${SPLIT_PROMPT-prompt-split-facts}            # empty: our prompt
CHANGEQ_PROMPT=${CHANGEQ_PROMPT-prompt-change-question}
WORK=${WORK:-work/llava15_minicpmv}
data_gen_pipeline
