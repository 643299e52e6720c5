#!/usr/bin/env bash
# bash script/world/reward_scaling.sh DEMO_DIR [OUT=DEMO_DIR/reward]
# RLAIF-V's self-feedback reward on the CPU demo's world (run script/demo/world_cpu.sh DEMO_DIR first):
#  1. best-of-N on held-out test scenes, N = 1..16, for the base and the loop's aligned policy, ranked by the reward
#     of the aligned policy against the base, next to the oracle's pick (muffin.world.scaling; seeds SEEDS);
#  2. one loop round from the base with reward-ranked feedback next to one with divide-and-conquer feedback from
#     the world's labeler, on the same prompts and DPO steps (the demo's round settings).
# Env: SEEDS ("0 1 2"), LIMIT (test scenes, 100), THREADS (torch threads, 1), ROUND=0 skips part 2.
set -euo pipefail
DEMO=${1:?usage: reward_scaling.sh DEMO_DIR [OUT]}; OUT=${2:-$DEMO/reward}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}"
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=../demo/recipe.sh
source "$HERE/../demo/recipe.sh"
ALIGNED=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['heldout'][-1]['policy'])" "$DEMO/loop/report.json")
mkdir -p "$OUT"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
python -m muffin.world.scaling --world "$DEMO/world" --policy base="$DEMO/base" --policy aligned="$ALIGNED" \
    --reward-model "$ALIGNED" --reward-reference "$DEMO/base" --split test --limit "${LIMIT:-100}" \
    --n 1 2 4 8 16 --seeds "${seeds[@]}" --out "$OUT/scaling"
[ "${ROUND:-1}" = 1 ] || exit 0
read -r -a config_args <<< "$DEMO_CONFIG_ARGS"
for fb in claims reward; do
    extra=(); [ "$fb" = reward ] && extra=(--set feedback=reward --set reward_model="$ALIGNED")
    python -m muffin.world.demo config --world "$DEMO/world" --policy "$DEMO/base" --out "$OUT/round_$fb" \
        --labeler "$DEMO/labeler" --iterations 1 ${config_args[@]+"${config_args[@]}"} "${extra[@]}" > "$OUT/round_$fb.json"
    python -m muffin.world.demo run --config "$OUT/round_$fb.json"
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| feedback (one round from the base) | CHAIR-i % | response hall. % | recall % |")
print("|---|---|---|---|")
for fb in ("claims", "reward"):
    rows = json.loads((out / f"round_{fb}" / "report.json").read_text())["heldout"]
    for r in rows:
        name = "base" if r["iteration"] == 0 else fb
        if fb == "reward" and name == "base":
            continue
        print(f"| {name} | {100 * r['chair_i']:.1f} | {100 * r['response_hallucination']:.1f} | {100 * r['recall']:.1f} |")
PY
