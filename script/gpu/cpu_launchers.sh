#!/usr/bin/env bash
# bash script/gpu/cpu_launchers.sh [WORK=/tmp/rlaifv_launchers]
# The training scripts' launch paths on the CPU with a tiny model, 2 steps each: every --launcher, with and without
# DeepSpeed ZeRO-2 (its CPU accelerator, gloo), one and two processes, and the flag errors a user can hit. Prints a
# table (launcher, deepspeed, processes, exit, seconds, last line) and leaves each run's launch.log in WORK.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
WORK="${1:-${WORK:-/tmp/rlaifv_launchers}}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$WORK"
[[ -f "$WORK/tiny/config.json" ]] || python -m utils.tiny_models llava "$WORK/tiny" > /dev/null
if [[ ! -f "$WORK/data/pairs.parquet" ]]; then
  python - "$WORK/data" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_train_data import write_rlaifv_parquet
d = write_rlaifv_parquet(Path(sys.argv[1]), n=8)
next(d.glob("*.parquet")).rename(d / "pairs.parquet")
EOF
fi
rm -rf "$WORK/data/pairs.parquet.logps"  # made by this run's first row, reused by the others (fingerprint checked)
COMMON=(--model_path "$WORK/tiny" --data "$WORK/data/pairs.parquet" --cpu --max_steps 2 --save_steps 1
  --learning_rate 1e-4 --disable_tqdm True --dataloader_num_workers 0)
printf '%-10s | %-9s | %-2s | %-4s | %-4s | %s\n' launcher deepspeed np exit s "last line"
run() {  # run LAUNCHER DS NP [extra...]
  local launcher="$1" ds="$2" np="$3" t0 rc out
  shift 3
  out="$WORK/run-$launcher-$(basename "$ds" .json)-$np"
  rm -rf "$out"; t0=$(date +%s)
  bash script/train/llava15_train_lora.sh "${COMMON[@]}" --output_dir "$out" --launcher "$launcher" \
    --deepspeed "$ds" --gpus "$np" "$@" > "$out.log" 2>&1; rc=$?
  printf '%-10s | %-9s | %-2s | %-4s | %-4s | %s\n' "$launcher" "$(basename "$ds")" "$np" "$rc" \
    "$(( $(date +%s) - t0 ))" "$(tail -n 1 "$out.log" | cut -c1-110)"
}
for launcher in python torchrun deepspeed accelerate; do
  run "$launcher" none 1
  run "$launcher" "$REPO/script/zero2.json" 1
done
run torchrun "$REPO/script/zero2.json" 2            # the CPU route runs one process whatever --gpus says
run python none 2
run mpirun none 1                                  # refused: unknown launcher
bash script/train/llava15_train_lora.sh --model_path "$WORK/tiny" --cpu > "$WORK/missing.log" 2>&1
printf '%-10s | %-9s | %-2s | %-4s | %-4s | %s\n' "(no data)" - - "$?" - "$(tail -n 1 "$WORK/missing.log")"
