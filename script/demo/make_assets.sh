#!/usr/bin/env bash
# bash script/demo/make_assets.sh [WORK_DIR]
#
# Rebuild the demo's shipped base policy and labeler (script/demo/assets/world_seed0) from scratch with the recipe
# in script/demo/recipe.sh: the seed-0 world, the base bootstrapped on it (4000 supervised steps), its labeler (with
# the own-claims phase). About 35 minutes on 2 CPU cores (--device auto: minutes on a GPU, where the numbers differ
# slightly: a build is repeatable for a given device and thread count). Then copies the two checkpoints (weights,
# configs, tokenizer, manifests, training logs) and the world's manifest into the assets directory.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK=${1:-runs/demo_assets}
ASSETS=${ASSETS:-"$HERE/assets/world_seed0"}
# shellcheck source=recipe.sh
source "$HERE/recipe.sh"
demo_build_base "$WORK"
mkdir -p "$ASSETS"
for m in base labeler; do
    rm -rf "${ASSETS:?}/$m" && cp -r "$WORK/$m" "$ASSETS/$m"
done
cp "$WORK/world/manifest.json" "$ASSETS/world_manifest.json"
du -sh "$ASSETS"
