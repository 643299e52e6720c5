#!/usr/bin/env bash
# DPO with LoRA (r 64, alpha 16, dropout 0.05 on every LM linear layer) + fully trained resampler, OmniLMM 12B.
#   bash script/train/omnilmm12b_train_lora.sh --model_path CKPT --data data/RLAIF-V-Dataset --output_dir runs/omnilmm12b_train_lora [--gpus 8] [train_dpo flags...]
# Paper settings: lr 1e-5, cosine, warmup ratio 0.05, weight decay 0.01, batch 1 per GPU, 2672 steps, save every
# 167 steps, max length 2048, beta 0.1, bf16 + tf32, gradient checkpointing, DeepSpeed zero2.
DEFAULT_DS_CONFIG="script/zero2.json"
DEFAULT_ARGS=(--learning_rate 1e-5 --use_lora True --lora_r 64 --lora_alpha 16 --lora_dropout 0.05)
source "$(dirname "${BASH_SOURCE[0]}")/_dpo_common.sh"
