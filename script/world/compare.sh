#!/usr/bin/env bash
# bash script/world/compare.sh [OUT]     (env: SEEDS="0 1 2", VARIANTS="ai oracle ai-oneshot oracle-oneshot",
#                                         JOBS=4 loops at a time, THREADS=2 torch threads per loop)
#
# Issue 7's comparisons on the synthetic world, mean and spread over seeds: AI feedback (a labeler that does not know
# the world, muffin.world.generic_labeler: the shipped one, or GENERIC_LABELER=CKPT) vs oracle feedback (ground
# truth), and iterative training (4 rounds, fresh samples from each round's policy) vs one-shot training (all
# prompts sampled from the base, the same number of DPO steps and pairs in one run).
# Variant names: ai | aiworld (the world-trained labeler build_base.sh makes per seed) | oracle, then optionally
# -oneshot and/or -keep (keep_start: a round is taken only when one of its checkpoints beats the round's start
# policy on the selection benchmark).
# Per seed: the world, its base policy and its world-trained labeler (only when an aiworld variant runs, or
# WORLD_LABELER=1) are built by build_base.sh in OUT/s<seed> (skipped when built; when only the world is missing,
# its loop splits are redrawn: a world is a pure function of its seed), then
# each variant's loop runs in OUT/s<seed>/<variant> (resumable: rerun to continue). Last, the table:
# OUT/compare.md, compare.json and compare.png (python -m muffin.world.demo compare).
# More env: BUILD_JOBS (seeds built at once, default 1; VARIANTS="" stops after the builds), BUILD_ARGS /
# BOOTSTRAP_ARGS / LABELER_ARGS (build_base.sh), CONFIG_ARGS (flags for `muffin.world.demo config`, e.g.
# "--set prompts_per_iteration=600 --set dpo.max_steps=120"), BAR (the plot's dashed line, default -50 %);
# script/world/compare_gpu.sh sets them all. GPUS: the GPUs that builds and loops are spread over, round robin
# (default: those in CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists; with one or none nothing is pinned).
set -euo pipefail
OUT=${1:-runs/world_compare}
SEEDS=${SEEDS:-0 1 2}
VARIANTS=${VARIANTS-ai oracle ai-oneshot oracle-oneshot}
JOBS=${JOBS:-4}
THREADS=${THREADS:-2}
HERE="$(cd "$(dirname "$0")" && pwd)"
# one generic labeler serves every seed: it is trained on its own draw and knows no world's answers
GENERIC_LABELER=${GENERIC_LABELER:-$HERE/../demo/assets/world_seed0/labeler_generic}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${GPUS+x}" ]; then
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then GPUS=${CUDA_VISIBLE_DEVICES//,/ }
    else GPUS=$( (nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true) | tr '\n' ' '); fi
fi
export GPUS
# the world-trained labeler is built only for the variants that take their feedback from it
if [ -z "${WORLD_LABELER:-}" ]; then
    WORLD_LABELER=0
    for v in $VARIANTS; do case $v in aiworld*) WORLD_LABELER=1 ;; esac; done
fi
export WORLD_LABELER

pin_gpu() {  # job index: job i runs on the i-th of GPUS (round robin) when there are several; WHERE says which
    local g
    read -r -a g <<< "$GPUS"
    WHERE=""
    if [ "${#g[@]}" -gt 1 ]; then export CUDA_VISIBLE_DEVICES=${g[$(( $1 % ${#g[@]} ))]}; WHERE=" on GPU $CUDA_VISIBLE_DEVICES"; fi
}

build_one() {  # seed
    local s=$1 d="$OUT/s$1" build_args
    if [ -f "$d/base/manifest.json" ] && { [ "$WORLD_LABELER" = 0 ] || [ -f "$d/labeler/manifest.json" ]; } \
        && [ ! -f "$d/world/manifest.json" ]; then
        read -r -a build_args <<< "${BUILD_ARGS:-}"
        python -m muffin.world.build --out "$d/world" --seed "$s" --n-feedback 1200 --n-val 300 --n-test 300 \
            --max-places "${MAX_PLACES:-2}" ${build_args[@]+"${build_args[@]}"} --n-sft 0
    fi
    SEED=$s bash "$HERE/build_base.sh" "$d"
}
export -f build_one pin_gpu
export OUT HERE GENERIC_LABELER
if [ "${BUILD_JOBS:-1}" -le 1 ]; then
    for s in $SEEDS; do build_one "$s"; done
else  # seeds built side by side (on the GPUs, round robin), each logged to OUT/build_s<seed>.log
    mkdir -p "$OUT"
    builds=()
    for s in $SEEDS; do builds+=("${#builds[@]} $s"); done  # job index, seed
    printf '%s\n' "${builds[@]}" | xargs -P "$BUILD_JOBS" -I{} bash -c 'set -- {}; pin_gpu "$1"
        build_one "$2" > "$OUT/build_s$2.log" 2>&1 && echo "built: seed $2$WHERE" || { echo "FAILED: build of seed $2 ($OUT/build_s$2.log)" >&2; exit 1; }'
fi
if [ -z "${VARIANTS// /}" ]; then echo "VARIANTS is empty: worlds, bases and labelers only"; exit 0; fi

jobs=()
for s in $SEEDS; do
    for v in $VARIANTS; do jobs+=("${#jobs[@]} $s $v"); done
done
run_one() {  # job index, seed, variant
    local s=$2 v=$3 d="$OUT/s$2"
    pin_gpu "$1"
    local labeler schedule=iterative keep=(--keep-start false)
    case $v in
        ai|ai-*) labeler="$GENERIC_LABELER" ;;
        aiworld|aiworld-*) labeler="$d/labeler" ;;
        oracle|oracle-*) labeler=oracle ;;
        *) echo "unknown variant '$v': ai|aiworld|oracle, then optionally -oneshot and/or -keep" >&2; return 2 ;;
    esac
    case $v in *-oneshot*) schedule=one-shot ;; esac
    case $v in *-keep*) keep=(--keep-start true) ;; esac
    local config_args
    read -r -a config_args <<< "${CONFIG_ARGS:-}"
    python -m muffin.world.demo config --world "$d/world" --policy "$d/base" --out "$d/$v" --labeler "$labeler" \
        --schedule "$schedule" --seed "$s" "${keep[@]}" ${config_args[@]+"${config_args[@]}"} > "$d/$v.json"
    OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS python -m muffin.world.demo run --config "$d/$v.json" > "$d/$v.log" 2>&1 \
        && echo "done: seed $s $v$WHERE" || { echo "FAILED: seed $s $v (log: $d/$v.log)" >&2; return 1; }
}
export -f run_one
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}'

runs=()
for s in $SEEDS; do
    for v in $VARIANTS; do runs+=("$OUT/s$s/$v"); done
done
python -m muffin.world.demo compare "${runs[@]}" --out "$OUT" --bar "${BAR:--50}"
