#!/usr/bin/env bash
# bash script/demo/world_cpu.sh [OUT_DIR]            (env: LABELER=world|initial|policy|oracle|<checkpoint>)
#
# The embedded default: on a fresh machine, CPU only, no downloads. Builds the synthetic world, installs its
# shipped base policy and labeler (REBUILD=1: bootstraps them; script/demo/make_assets.sh remakes the shipped
# ones), runs the iterative RLAIF-V loop (generate -> divide -> changeq -> conquer -> pairs ->
# balance -> export -> reference log-probs -> DPO -> evaluate checkpoints -> select) and prints the held-out table,
# then checks the bar: CHAIR-i and response-level hallucination at most half of the base, recall down at most 5
# points (exit status 1 when the bar is not met).
# LABELER picks the feedback: `world` (default: AI feedback from the world's labeler, the base fine-tuned on yes/no
# questions by muffin.world.labeler, as RLAIF-V 7B takes its feedback from another open model), `initial` (the base
# policy labels its own answers: self-feedback), `policy` (the current policy), `oracle` (the world's ground truth:
# the upper bound AI feedback is compared with) or a checkpoint path.
# The same world, base and labeler are reused, so `LABELER=oracle bash script/demo/world_cpu.sh` after the default
# run only runs the loop. Rerunning resumes: finished stages are skipped. Report and plots: $OUT/loop[_LABELER]/report.md.
set -euo pipefail
OUT=${1:-runs/world_demo}
LABELER=${LABELER:-world}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch threads (THREADS, default 1, recorded in the output): more threads than free cores slow the small models'
# many tiny kernels down a lot; raise it on a quiet machine
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}"
start=$(date +%s)

# 1. the world (seconds), then the base policy and the labeler: copied from the shipped assets, whose recipe
# (script/demo/recipe.sh) takes ~35 minutes on 2 cores, or rebuilt from scratch with REBUILD=1 (skipped when
# already there; manifest.json is written last by the bootstrap and by the labeler, so an interrupted one is redone)
HERE="$(cd "$(dirname "$0")" && pwd)"
ASSETS=${ASSETS:-"$HERE/assets/world_seed0"}
# shellcheck source=recipe.sh
source "$HERE/recipe.sh"
if [ "${REBUILD:-0}" = 1 ] || [ ! -f "$ASSETS/base/manifest.json" ]; then
    demo_build_base "$OUT"
else
    WORLD_ONLY=1 demo_build_base "$OUT"
    python -m muffin.world.demo install --assets "$ASSETS" --world "$OUT/world" --out "$OUT"
fi

# 2. the loop: 4 iterations, rule-based claim splitting and questions, feedback from $LABELER
LOOP="$OUT/loop"
if [ "$LABELER" = world ]; then LABEL_WITH="$OUT/labeler"; else LABEL_WITH="$LABELER"; LOOP="$OUT/loop_$(basename "$LABELER")"; fi
read -r -a config_args <<< "$DEMO_CONFIG_ARGS"
python -m muffin.world.demo config --world "$OUT/world" --policy "$OUT/base" --out "$LOOP" --labeler "$LABEL_WITH" \
    ${config_args[@]+"${config_args[@]}"} > "$LOOP.json"
python -m muffin.loop --config "$LOOP.json"

# 3. the bar
echo "demo finished in $(( $(date +%s) - start )) s with $OMP_NUM_THREADS torch thread(s); report: $LOOP/report.md"
python - "$LOOP" <<'PY'
import json, sys
from pathlib import Path
for state in sorted(Path(sys.argv[1]).glob("iter*/state.json"), key=lambda p: int(p.parent.name[4:])):
    sec = json.loads(state.read_text()).get("seconds", {})
    stages = ", ".join(f"{k} {v:.0f}" for k, v in sec.items())
    print(f"  {state.parent.name}: {sum(sec.values()):.0f} s ({stages})")
PY
python -m muffin.world.demo check --report "$LOOP/report.json"
