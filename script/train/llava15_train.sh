#!/usr/bin/env bash
# DPO full fine-tuning of LLaVA 1.5 7B (RLAIF-V 7B recipe; vision tower frozen, LM + projector trained).
#   bash script/train/llava15_train.sh --model_path CKPT --data data/RLAIF-V-Dataset --output_dir runs/llava15_train [--gpus 8] [train_dpo flags...]
# Paper settings: lr 5e-7, cosine, warmup ratio 0.05, weight decay 0.01, batch 1 per GPU, 2672 steps, save every
# 167 steps, max length 2048, beta 0.1, bf16 + tf32, gradient checkpointing, DeepSpeed zero2.
DEFAULT_DS_CONFIG="script/zero2.json"
DEFAULT_ARGS=(--learning_rate 5e-7 )
source "$(dirname "${BASH_SOURCE[0]}")/_dpo_common.sh"
