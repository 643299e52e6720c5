#!/usr/bin/env bash
# bash script/gpu/run_issue33.sh OUT_DIR
# Issue 33's scripted run: the user's own commands on a random-weight checkpoint of a released shape (LLaVA 1.5 7B or
# OmniLMM 12B, SHAPE) saved by its family's save_pretrained.
# Phases (PHASES, in order; each logs to $WORK/logs/<phase>.log with arrival times, script/gpu/stamp.py):
#   setup   versions, GPU, wheels from .whl/ when present (packages the GPU image lacks: deepspeed, trl, datasets)
#   ckpt    muffin.world.build (32 feedback scenes), python -m script.gpu.make_checkpoint --shape $SHAPE (kept)
#   data    script/data_gen/run_data_pipeline_self_feedback.sh with the
#           policy as labeler, rule divide/changeq, 10 samples -> $WORK/data/dataset.parquet
#   train   the shape's training script (TRAIN_SCRIPT below; ZeRO-2 for LoRA on a GPU, the full fine-tuning scripts'
#           own ZeRO stage) for $STEPS steps, killed (SIGKILL to its process group) once checkpoint-$SAVE exists and
#           $KILL_AFTER more steps ran, then the same command again (resumes)
#   speed   the same training script, uninterrupted, into a fresh output dir (steady-state step times)
#   eval    python -m eval.answer --benchmark jsonl on the 32 feedback prompts with the trained model
#   chat    python chat.py on the trained model
#   trl     script/gpu/trl_dpo.py: TRL's stock DPOTrainer.train() on the same parquet and checkpoint (LLaVA shapes only:
#           the stock DPOTrainer cannot feed OmniLMM images, so the phase is recorded as skipped for omni12b/omni-tiny)
# Then script/gpu/summarize.py writes $OUT_DIR/summary.md. Env: SHAPE (7b | tiny: LLaVA 1.5, script/train/llava15_*;
# omni12b | omni-tiny: OmniLMM 12B, script/train/omnilmm12b_*; tiny shapes are CPU smoke runs), TUNE (lora | full:
# the *_train_lora.sh or the full fine-tuning *_train.sh script), WORK, STEPS, SAVE, BATCH, KILL_AFTER, NUM_SAMPLES,
# MAX_NEW_TOKENS (of the generate stage), TRL_STEPS, DEADLINE_S (phases that would start later than this many seconds
# after the start are skipped) and HARD_S (a phase still running this many seconds after the start is stopped), so
# that the summary is written inside the device's per-command limit.
set -uo pipefail
set -a  # every variable below reaches the phases, which run as `bash -c phase_NAME` under a time limit
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
OUT_DIR="${1:?usage: run_issue33.sh OUT_DIR}"
mkdir -p "$OUT_DIR"
SHAPE="${SHAPE:-7b}"; TUNE="${TUNE:-lora}"
case "$SHAPE" in
  7b|tiny) RECIPE=llava15 ;;
  omni12b|omni-tiny) RECIPE=omnilmm12b ;;
  *) echo "error: SHAPE must be 7b, tiny, omni12b or omni-tiny, got '$SHAPE'" >&2; exit 2 ;;
esac
case "$TUNE" in
  lora) TRAIN_SCRIPT="script/train/${RECIPE}_train_lora.sh" ;;
  full) TRAIN_SCRIPT="script/train/${RECIPE}_train.sh" ;;
  *) echo "error: TUNE must be lora (the *_train_lora.sh scripts) or full (*_train.sh), got '$TUNE'" >&2; exit 2 ;;
esac
WORK="${WORK:-$REPO/runs/gpu33}"
PHASES="${PHASES:-setup ckpt data train eval chat trl}"
STEPS="${STEPS:-30}"; SAVE="${SAVE:-10}"; BATCH="${BATCH:-8}"; KILL_AFTER="${KILL_AFTER:-2}"
TRL_STEPS="${TRL_STEPS:-12}"; SPEED_STEPS="${SPEED_STEPS:-24}"
DEADLINE_S="${DEADLINE_S:-100000}"; HARD_S="${HARD_S:-100000}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOGS="$WORK/logs"
# a rerun in the same WORK (a warm device machine keeps it) starts fresh logs; outputs are kept and reused
[[ -d "$LOGS" ]] && mv "$LOGS" "$WORK/logs.$(date +%s)"
mkdir -p "$LOGS"
TIMES="$LOGS/phases.tsv"; [[ -f "$TIMES" ]] || printf 'phase\trc\tseconds\tstart_epoch\n' > "$TIMES"
START=$(date +%s)
printf '{"SHAPE": "%s", "TUNE": "%s", "TRAIN_SCRIPT": "%s", "STEPS": %s, "SAVE": %s, "BATCH": %s, "NUM_SAMPLES": %s, '\
'"MAX_NEW_TOKENS": %s, "TRL_STEPS": %s, "SPEED_STEPS": %s}\n' "$SHAPE" "$TUNE" "$TRAIN_SCRIPT" "$STEPS" "$SAVE" \
  "$BATCH" "${NUM_SAMPLES:-10}" "${MAX_NEW_TOKENS:-512}" "$TRL_STEPS" "$SPEED_STEPS" > "$LOGS/env.json"
CKPT="$WORK/ckpt"; DATA="$WORK/data"; LORA="$WORK/lora"  # LORA: the training output (a LoRA adapter, or full weights)
GPU=0; nvidia-smi -L >/dev/null 2>&1 && GPU=1
[[ "$GPU" == 1 ]] || export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator (gloo) when no GPU is visible

# the scripts call `python` (and torchrun); where only python3 exists (the GPU image), a shim names it
if ! command -v python >/dev/null; then
  mkdir -p /tmp/pyshim && ln -sf "$(command -v "$PY")" /tmp/pyshim/python && export PATH="/tmp/pyshim:$PATH"
  echo "note: no 'python' on PATH; /tmp/pyshim/python -> $(command -v "$PY")"
fi
stamp() { "$PY" "$REPO/script/gpu/stamp.py"; }
if [[ -z "${SKIP_WHEELS:-}" ]] && compgen -G "$REPO/.whl/*.whl" > /dev/null; then  # packages the GPU image lacks (script/bench/README.md)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$REPO"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="$PATH:/tmp/site/bin"
fi

# run_phase NAME FUNCTION: skipped past the deadline, or where the shape cannot run it (unsupported NAME prints why);
# output stamped into $LOGS/NAME.log; rc and seconds recorded
run_phase() {
  local name="$1" fn="$2" t0 rc why
  t0=$(date +%s)
  why="$(unsupported "$name")"
  (( t0 - START > DEADLINE_S )) && why="deadline"
  if [[ -n "$why" ]]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$t0" >> "$TIMES"; echo "== $name skipped: $why" | tee "$LOGS/$name.log"
    return
  fi
  echo "== $name ($(date -u +%H:%M:%S))"
  timeout -k 10 "$(( HARD_S - (t0 - START) ))" bash -c "set -o pipefail; $fn 2>&1 | stamp >> '$LOGS/$name.log'"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$t0" >> "$TIMES"
  echo "   rc=$rc, $(( $(date +%s) - t0 )) s; last lines:"; tail -n 4 "$LOGS/$name.log" | cut -c1-300
}

# why a phase cannot run for this SHAPE (empty: it can)
unsupported() {
  if [[ "$1" == trl && "$RECIPE" != llava15 ]]; then
    echo "TRL's stock DPOTrainer does not support OmniLMM (SHAPE=$SHAPE): it feeds images through a transformers" \
      "processor and a model it can load with AutoModel classes; OmniLMM has no processor (its images are" \
      "spans of image-marker tokens that OmniLMMFamily.encode writes) and script/gpu/trl_dpo.py loads LLaVA." \
      "No TRL baseline for this shape"
  fi
}

# TRAINED: what eval and chat load, the base checkpoint with the adapter merged or the fully fine-tuned weights (an
# array, set in the phase's own shell: arrays are not exported)
set_trained() {
  if [[ "$TUNE" == lora ]]; then TRAINED=(--model-path "$CKPT" --lora-path "$LORA"); else TRAINED=(--model-path "$LORA"); fi
}

# GPU memory in use, once a second, while training and TRL run (compared as the same reading for both)
gpumem_start() {
  [[ "$GPU" == 1 ]] || return 0
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 500 >> "$LOGS/gpumem_$1.csv" &
  MEMPID=$!
}
gpumem_stop() { [[ -n "${MEMPID:-}" ]] && kill "$MEMPID" 2>/dev/null; MEMPID=""; }

phase_setup() {
  echo "PYTHONPATH=$PYTHONPATH; wheels: $(ls "$REPO/.whl" 2>/dev/null | tr '\n' ' ')"
  nvidia-smi || true
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for m in ["torch", "transformers", "accelerate", "peft", "deepspeed", "trl", "datasets", "pyarrow", "tokenizers",
          "safetensors", "pydantic", "numpy", "PIL", "timm"]:
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # a missing package is what this phase reports
        print(m, "MISSING", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF
  git -C "$REPO" rev-parse HEAD 2>/dev/null || cat "$REPO/.git/HEAD" 2>/dev/null || true
}

phase_ckpt() {  # the world first: its images centre the checkpoint's yes/no read-out (make_checkpoint.py)
  [[ -f "$WORK/world/feedback/prompts.jsonl" ]] || "$PY" -m muffin.world.build --out "$WORK/world" --seed 0 \
    --n-sft 0 --n-feedback 32 --n-val 0 --n-test 0 --image-size 336 || return 1
  "$PY" -m script.gpu.make_checkpoint --shape "$SHAPE" --out "$CKPT" \
    --calibration-images "$WORK"/world/feedback/images/feedback_00000[0-3].png || return 1
  du -sh "$CKPT"
}

phase_data() {
  # the script's default --prompt-file values name the released split/changeq models' prompts, which the rule
  # backends never read but the stages resolve (and refuse when not fetched): pass our own templates as files
  "$PY" -c "from muffin.feedback.divide import DEFAULT_SPLIT_TEMPLATE as s; open('$WORK/split.txt', 'w').write(s)"
  "$PY" -c "from muffin.feedback.changeq import DEFAULT_CHANGEQ_TEMPLATE as s; open('$WORK/changeq.txt', 'w').write(s)"
  PROMPTS="$WORK/world/feedback/prompts.jsonl" IMAGE_ROOT="$WORK/world" POLICY="$CKPT" SPLITTER=rule CHANGEQ=rule \
    SPLIT_PROMPT="$WORK/split.txt" CHANGEQ_PROMPT="$WORK/changeq.txt" \
    WORK="$DATA" NGPU=1 NUM_SAMPLES="${NUM_SAMPLES:-10}" GEN_BATCH="${GEN_BATCH:-80}" bash script/data_gen/run_data_pipeline_self_feedback.sh
}

train_cmd() {  # the user's training command ($TRAIN_SCRIPT); $1: output dir, $2: steps
  bash "$TRAIN_SCRIPT" --model_path "$CKPT" --data "$DATA/dataset.parquet" --output_dir "$1" \
    --max_steps "$2" --save_steps "$SAVE" --per_device_train_batch_size "$BATCH" --seed 0 ${TRAIN_EXTRA:-}
}

phase_train() {
  local pid n t_end
  gpumem_start train
  setsid bash -c "$(declare -f train_cmd); CKPT='$CKPT' DATA='$DATA' SAVE='$SAVE' BATCH='$BATCH' \
    TRAIN_SCRIPT='$TRAIN_SCRIPT' TRAIN_EXTRA='${TRAIN_EXTRA:-}'; train_cmd '$LORA' '$STEPS'" &
  pid=$!
  # wait for checkpoint-$SAVE (renamed into place only when complete), then $KILL_AFTER more logged steps
  while kill -0 "$pid" 2>/dev/null && [[ ! -d "$LORA/checkpoint-$SAVE" ]]; do sleep 1; done
  n=$(grep -c "'loss'" "$LORA/launch.log" 2>/dev/null || echo 0)
  t_end=$(( $(date +%s) + 300 ))
  while kill -0 "$pid" 2>/dev/null && (( $(grep -c "'loss'" "$LORA/launch.log" 2>/dev/null || echo 0) < n + KILL_AFTER )) \
    && (( $(date +%s) < t_end )); do sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "KILL: SIGKILL to process group $pid after $(grep -c "'loss'" "$LORA/launch.log") logged steps"
    kill -KILL -- "-$pid"; wait "$pid" 2>/dev/null
  else
    wait "$pid"; echo "run ended before the kill (rc $?)"
  fi
  ls "$LORA"
  cp "$LORA/launch.log" "$LOGS/train_first_launch.log"
  echo "RESUME: the same command again"
  train_cmd "$LORA" "$STEPS"; local rc=$?
  gpumem_stop
  ls "$LORA"
  return $rc
}

phase_speed() {
  gpumem_start speed
  rm -rf "$WORK/speed"
  train_cmd "$WORK/speed" "$SPEED_STEPS"; local rc=$?
  gpumem_stop; return $rc
}

phase_eval() {
  "$PY" - "$WORK" <<'EOF' || return 1
import json, sys
w = sys.argv[1]
with open(f"{w}/world/feedback/prompts.jsonl") as f, open(f"{w}/eval_questions.jsonl", "w") as g:
    for rec in map(json.loads, f):
        g.write(json.dumps({"id": rec["ds_question_id"], "question": rec["question"], "image": rec["image_path"]}) + "\n")
EOF
  rm -f "$WORK/eval_answers.jsonl"
  set_trained
  "$PY" -m eval.answer --benchmark jsonl --questions "$WORK/eval_questions.jsonl" --image-root "$WORK/world" \
    "${TRAINED[@]}" --out "$WORK/eval_answers.jsonl" --batch-size 32 --max-new-tokens 256 \
    || return 1
  head -c 600 "$WORK/eval_answers.jsonl"; echo
}

phase_chat() {
  set_trained
  "$PY" chat.py "${TRAINED[@]}" --image "$WORK/world/feedback/images/feedback_000000.png" \
    --question "Describe this image in detail." --max-new-tokens 64
}

phase_trl() {
  gpumem_start trl
  "$PY" -m script.gpu.trl_dpo --model_path "$CKPT" --data "$DATA/dataset.parquet" --output_dir "$WORK/trl" \
    --steps "$TRL_STEPS" --batch_size "$BATCH" --stats "$WORK/trl_stats.json"; local rc=$?
  gpumem_stop; return $rc
}

export -f stamp unsupported set_trained gpumem_start gpumem_stop train_cmd $(compgen -A function phase_)
for p in $PHASES; do run_phase "$p" "phase_$p"; done
"$PY" script/gpu/summarize.py "$WORK" > "$OUT_DIR/summary.md" 2> "$OUT_DIR/summarize.err"
cat "$OUT_DIR/summary.md"
tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d data/*.manifest.json data/*/manifest.json \
  data/report lora/manifest.json lora/launch.log speed/launch.log eval_answers.jsonl* trl_stats.json 2>/dev/null)
cp "$DATA/dataset.parquet" "$OUT_DIR/" 2>/dev/null || true
