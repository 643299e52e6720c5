#!/usr/bin/env bash
# bash script/demo/world_cpu.sh [OUT_DIR]            (env: LABELER=generic|world-trained|initial|policy|oracle|<checkpoint>)
#
# The embedded default: on a fresh machine, CPU only, no downloads. Builds the synthetic world, installs its
# shipped base policy and labeler (REBUILD=1: bootstraps them; script/demo/make_assets.sh remakes the shipped
# ones), runs the iterative RLAIF-V loop (generate -> divide -> changeq -> conquer -> pairs ->
# balance -> export -> reference log-probs -> DPO -> evaluate checkpoints -> select) and prints the held-out table,
# then checks the bar: CHAIR-i, response-level hallucination and the error rate of each hallucination source
# (partner, colour, count, position) at most half of the base's, recall and count accuracy down at most 5 points
# (exit status 1 when the bar is not met). It prints the machine, the time of the build and of each iteration and
# stage, and writes them to $OUT/timing[_LABELER].json.
# LABELER picks the feedback: `generic` (default: AI feedback from a labeler that does not know this world, a tiny
# LLaVA trained from scratch on another world's scenes with generic yes/no questions by muffin.world.generic_labeler,
# as RLAIF-V 7B takes its feedback from another open model), `world-trained` (alias `world`: the base fine-tuned on
# this world's own scenes with negatives from its planted sources by muffin.world.labeler; close to the oracle by
# construction), `initial` (the base policy labels its own answers: self-feedback), `policy` (the current policy),
# `oracle` (the world's ground truth: the upper bound AI feedback is compared with) or a checkpoint path.
# The same world, base and labeler are reused, so `LABELER=oracle bash script/demo/world_cpu.sh` after the default
# run only runs the loop. Rerunning resumes: finished stages are skipped. Report and plots: $OUT/loop[_LABELER]/report.md.
set -euo pipefail
OUT=${1:-runs/world_demo}
LABELER=${LABELER:-generic}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch threads (THREADS, default 1, recorded in the output): more threads than free cores slow the small models'
# many tiny kernels down a lot; raise it on a quiet machine
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}"
start=$(date +%s)
MACHINE="$(nproc --all) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg) at the start, $OMP_NUM_THREADS torch thread(s)"
echo "machine: $MACHINE"

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
# the generic labeler (the default feedback) depends on no feedback world: the shipped one serves every world, REBUILD
# included; REBUILD_GENERIC=1 (or no shipped one) retrains it (muffin.world.generic_labeler's defaults: about an hour
# on 2 busy cores, docs/WORLD.md)
if [ ! -f "$OUT/labeler_generic/manifest.json" ]; then
    if [ "${REBUILD_GENERIC:-0}" = 1 ] || [ ! -f "$ASSETS/labeler_generic/manifest.json" ]; then
        python -m muffin.world.generic_labeler --out "$OUT/labeler_generic" --work "$OUT/generic_world"
    else
        rm -rf "$OUT/labeler_generic" && mkdir -p "$OUT" && cp -r "$ASSETS/labeler_generic" "$OUT/labeler_generic"
    fi
fi

built=$(date +%s)
echo "world, base and labeler ready in $(( built - start )) s"

# 2. the loop: 4 iterations, rule-based claim splitting and questions, feedback from $LABELER
LOOP="$OUT/loop"
case "$LABELER" in
    generic) LABEL_WITH="$OUT/labeler_generic" ;;
    world | world-trained) LABEL_WITH="$OUT/labeler"; LOOP="$OUT/loop_world-trained" ;;
    *) LABEL_WITH="$LABELER"; LOOP="$OUT/loop_$(basename "$LABELER")" ;;
esac
read -r -a config_args <<< "$DEMO_CONFIG_ARGS"
python -m muffin.world.demo config --world "$OUT/world" --policy "$OUT/base" --out "$LOOP" --labeler "$LABEL_WITH" \
    ${config_args[@]+"${config_args[@]}"} > "$LOOP.json"
python -m muffin.world.demo run --config "$LOOP.json"

# 3. the bar
echo "demo finished in $(( $(date +%s) - start )) s with $OMP_NUM_THREADS torch thread(s); report: $LOOP/report.md"
python - "$LOOP" "$OUT/timing${LOOP#"$OUT/loop"}.json" "$MACHINE" "$(( built - start ))" "$(( $(date +%s) - built ))" <<'PY'
import json, sys
from pathlib import Path
loop, out, machine, build, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
iterations = {}
for state in sorted(loop.glob("iter*/state.json"), key=lambda p: int(p.parent.name[4:])):
    sec = json.loads(state.read_text()).get("seconds", {})
    iterations[state.parent.name] = {"seconds": round(sum(sec.values())), "stages": {k: round(v) for k, v in sec.items()}}
    stages = ", ".join(f"{k} {v:.0f}" for k, v in sec.items())
    print(f"  {state.parent.name}: {sum(sec.values()):.0f} s ({stages})")
out.write_text(json.dumps({"machine": machine, "build_seconds": build, "loop_and_report_seconds": total,
                           "iterations": iterations}, indent=1) + "\n")
print(f"  timing: {out}")
PY
python -m muffin.world.demo check --report "$LOOP/report.json"
