#!/usr/bin/env bash
# DPO full fine-tuning of OmniLMM 12B (RLAIF-V 12B recipe; vision tower frozen). ZeRO-3: the 12B model does not fit ZeRO-2 on 80 GB.
#   bash script/train/omnilmm12b_train.sh --model_path CKPT --data data/RLAIF-V-Dataset --output_dir runs/omnilmm12b_train [--gpus 8] [train_dpo flags...]
# Paper settings: lr 5e-7, cosine, warmup ratio 0.05, weight decay 0.01, batch 1 per GPU, 2672 steps, save every
# 167 steps, max length 2048, beta 0.1, bf16 + tf32, gradient checkpointing, DeepSpeed zero3.
DEFAULT_DS_CONFIG="script/zero3.json"
DEFAULT_ARGS=(--learning_rate 5e-7 )
source "$(dirname "${BASH_SOURCE[0]}")/_dpo_common.sh"
