#!/usr/bin/env bash
# bash script/world/compare.sh [OUT]     (env: SEEDS="0 1 2", VARIANTS="ai oracle ai-oneshot oracle-oneshot",
#                                         JOBS=4 loops at a time, THREADS=2 torch threads per loop)
#
# Issue 7's comparisons on the synthetic world, mean and spread over seeds: AI feedback (the world's labeler) vs
# oracle feedback (ground truth), and iterative training (4 rounds, fresh samples from each round's policy) vs
# one-shot training (all prompts sampled from the base, the same number of DPO steps and pairs in one run).
# Variant names: ai | oracle, then optionally -oneshot and/or -keep (keep_start: a round is taken only when one
# of its checkpoints beats the round's start policy on the selection benchmark).
# Per seed: the world, its base policy and its labeler are built by build_base.sh in OUT/s<seed> (skipped when
# built; when only the world is missing, its loop splits are redrawn: a world is a pure function of its seed), then
# each variant's loop runs in OUT/s<seed>/<variant> (resumable: rerun to continue). Last, the table:
# OUT/compare.md, compare.json and compare.png (python -m muffin.world.demo compare).
set -euo pipefail
OUT=${1:-runs/world_compare}
SEEDS=${SEEDS:-0 1 2}
VARIANTS=${VARIANTS:-ai oracle ai-oneshot oracle-oneshot}
JOBS=${JOBS:-4}
THREADS=${THREADS:-2}
HERE="$(cd "$(dirname "$0")" && pwd)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

for s in $SEEDS; do
    d="$OUT/s$s"
    if [ -f "$d/base/manifest.json" ] && [ -f "$d/labeler/manifest.json" ] && [ ! -f "$d/world/manifest.json" ]; then
        python -m muffin.world.build --out "$d/world" --seed "$s" --n-sft 0 --n-feedback 1200 --n-val 300 --n-test 300 \
            --max-places "${MAX_PLACES:-2}"
    fi
    SEED=$s bash "$HERE/build_base.sh" "$d"
done

jobs=()
for s in $SEEDS; do
    for v in $VARIANTS; do jobs+=("$s $v"); done
done
run_one() {  # seed variant
    local s=$1 v=$2 d="$OUT/s$1"
    local labeler schedule=iterative keep=(--keep-start false)
    case $v in
        ai|ai-*) labeler="$d/labeler" ;;
        oracle|oracle-*) labeler=oracle ;;
        *) echo "unknown variant '$v': ai|oracle, then optionally -oneshot and/or -keep" >&2; return 2 ;;
    esac
    case $v in *-oneshot*) schedule=one-shot ;; esac
    case $v in *-keep*) keep=(--keep-start true) ;; esac
    python -m muffin.world.demo config --world "$d/world" --policy "$d/base" --out "$d/$v" --labeler "$labeler" \
        --schedule "$schedule" --seed "$s" "${keep[@]}" > "$d/$v.json"
    OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS python -m muffin.loop --config "$d/$v.json" > "$d/$v.log" 2>&1 \
        && echo "done: seed $s $v" || { echo "FAILED: seed $s $v (log: $d/$v.log)" >&2; return 1; }
}
export -f run_one
export OUT
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}'

runs=()
for s in $SEEDS; do
    for v in $VARIANTS; do runs+=("$OUT/s$s/$v"); done
done
python -m muffin.world.demo compare "${runs[@]}" --out "$OUT"
