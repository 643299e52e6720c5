#!/usr/bin/env bash
# bash script/bench/compare_commits.sh [--out DIR] REV_A REV_B -- COMMAND...
#
# Run the same benchmark command in the trees of two commits, one after the other on the same machine (e.g. before
# and after a refactor: "speed unchanged" needs both numbers from one GPU in one lease). Each commit is exported
# with `git archive` into DIR/<rev> (untracked and uncommitted files never leak in), the command runs there with
# that tree first on PYTHONPATH and its own torch compile cache, its output is printed under a header and kept in
# DIR/<rev>.log. Order: A, B, then A again when REPEAT=1 (a drift check: A's two runs should agree).
set -euo pipefail
OUT=""
if [[ "${1:-}" == "--out" ]]; then OUT="$2"; shift 2; fi
if [[ $# -lt 4 || "$3" != "--" ]]; then
  echo "usage: compare_commits.sh [--out DIR] REV_A REV_B -- COMMAND..." >&2; exit 2
fi
A="$1"; B="$2"; shift 3
REPO="$(git rev-parse --show-toplevel)"
OUT="${OUT:-$(mktemp -d /tmp/compare_commits.XXXX)}"
mkdir -p "$OUT"
declare -A SHA
for rev in "$A" "$B"; do  # both checked before anything runs
  SHA[$rev]="$(git -C "$REPO" rev-parse -q --verify "$rev^{commit}")" || { echo "error: '$rev' is not a commit" >&2; exit 2; }
done
runs=("$A" "$B"); [[ "${REPEAT:-0}" == 1 ]] && runs+=("$A")
n=0
for rev in "${runs[@]}"; do
  sha="${SHA[$rev]}"
  tree="$OUT/$sha"
  if [[ ! -d "$tree" ]]; then mkdir -p "$tree" && git -C "$REPO" archive "$sha" | tar -x -C "$tree"; fi
  n=$((n + 1))
  echo "=== $rev ($sha), run $n, $(date -u +%H:%M:%S)"
  (cd "$tree" && TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-$sha" PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" "$@") \
    2>&1 | tee "$OUT/$sha.run$n.log"
done
echo "=== logs in $OUT"
