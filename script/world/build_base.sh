#!/usr/bin/env bash
# bash script/world/build_base.sh [OUT_DIR]
#
# Build the synthetic world and bootstrap its base policy (a tiny LLaVA 1.5: CLIP + Llama + a world tokenizer):
# vision-tower pre-training on the scenes' cells, projector alignment, then supervised training on biased
# descriptions and true answers; then its labeler (the base fine-tuned on yes/no claim questions, muffin.world.labeler).
# Each step is skipped when its manifest.json (written last) exists.
# Deterministic for a given seed; on 2 CPU cores it takes a few minutes. The result is an ordinary llava-hf
# checkpoint that `muffin.load_family`, the feedback pipeline and the trainer load like any other.
# Env: SEED (0), MAX_PLACES (2), ALIGN_PLACES (false), WORLD_ONLY (1: the world alone), WORLD_LABELER (0: no
# world-trained labeler; compare.sh sets it when no variant uses one); BUILD_ARGS, BOOTSTRAP_ARGS,
# LABELER_ARGS: more flags for muffin.world.build / .bootstrap / .labeler (later flags win), e.g. the larger world of
# script/world/compare_gpu.sh; BUILD_THREADS (default 1): CPU threads of torch (OMP/MKL), set here whatever the
# caller's environment says, so a build's speed (and on the CPU its numbers) do not depend on it; every manifest
# records them.
# Bootstrap and labeler train on the GPU when there is one (--device auto).
set -euo pipefail
OUT=${1:-runs/world_demo}
SEED=${SEED:-0}
read -r -a build_args <<< "${BUILD_ARGS:-}"
read -r -a bootstrap_args <<< "${BOOTSTRAP_ARGS:-}"
read -r -a labeler_args <<< "${LABELER_ARGS:-}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${BUILD_THREADS:-1}" MKL_NUM_THREADS="${BUILD_THREADS:-1}"

if [ "${WORLD_ONLY:-0}" = 1 ]; then built="$OUT/world/manifest.json"; else built="$OUT/base/manifest.json"; fi
if [ ! -f "$built" ]; then
    python -m muffin.world.build --out "$OUT/world" --seed "$SEED" \
        --n-sft 4000 --n-feedback 1200 --n-val 300 --n-test 300 --max-places "${MAX_PLACES:-2}" \
        ${build_args[@]+"${build_args[@]}"}
fi
if [ "${WORLD_ONLY:-0}" = 1 ]; then exit 0; fi
if [ ! -f "$OUT/base/manifest.json" ]; then
    python -m muffin.world.bootstrap --world "$OUT/world" --out "$OUT/base" --seed "$SEED" \
        --align-places "${ALIGN_PLACES:-false}" ${bootstrap_args[@]+"${bootstrap_args[@]}"}
fi
# the labeler's log holds the base's and the labeler's read-out on val claim questions (val_before / val_after);
# the loop evaluates the base itself (CHAIR on val and test). For a standalone look at the base:
#   python -m muffin.world.evaluate --world "$OUT/world" --model "$OUT/base" --split val --labeler
if [ "${WORLD_LABELER:-1}" != 0 ] && [ ! -f "$OUT/labeler/manifest.json" ]; then
    python -m muffin.world.labeler --world "$OUT/world" --base "$OUT/base" --out "$OUT/labeler" --seed "$SEED" --eval-scenes 50 \
        ${labeler_args[@]+"${labeler_args[@]}"}
fi
