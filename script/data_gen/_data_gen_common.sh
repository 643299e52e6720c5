#!/usr/bin/env bash
# Shared launcher of the script/data_gen/run_data_pipeline_*.sh wrappers (sourced with "$@", then the wrapper sets
# its defaults and calls data_gen_pipeline): runs the feedback pipeline (python -m muffin.feedback.pipeline, the stage
# table of muffin.feedback.stages) on every visible GPU, so scripts, pipeline CLI and loop share stages and knobs.
#   --prompts FILE --image-root DIR --policy CKPT --labeler CKPT --work DIR (or WORK as the one positional argument)
#   --splitter CKPT|rule --changeq CKPT|rule --splitter-prompt FILE|NAME --changeq-prompt FILE|NAME (empty: ours)
#   --num-samples N --max-new-tokens N --batch-size N --seed N --question-type T --gpus N --trust-remote-code
#   --policy-server URLS --labeler-server URLS --splitter-server URLS --changeq-server URLS (served models)
#   --feedback claims|reward --reward-model CKPT --reward-reference CKPT --top-k N --max-word-gap N
#   --dry-run: print the pipeline command and exit (what the flags and variables make of it)
# Each flag has an environment variable of the same name in capitals (PROMPTS, IMAGE_ROOT, POLICY, ..., WORK; NGPU
# for --gpus, GEN_BATCH for --batch-size, SPLIT_PROMPT for --splitter-prompt): flag > variable > the wrapper's
# default. Any other flag goes to the pipeline as is (e.g. --max-pairs 4 --score expected; its --help lists them).
# Every stage resumes: rerun the same command after a crash.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) grep '^#' "$0" | tail -n +2; echo "#"; grep '^#' "$REPO/script/data_gen/_data_gen_common.sh" | sed -n '5,14p'; exit 0 ;;
    --trust-remote-code) TRUST_REMOTE_CODE=1; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --*) [[ $# -ge 2 ]] || { echo "error: $1 needs a value (see $0 --help)" >&2; exit 2; } ;;
  esac
  case "$1" in
    --prompts) PROMPTS="$2" ;;
    --image-root) IMAGE_ROOT="$2" ;;
    --policy) POLICY="$2" ;;
    --labeler) LABELER="$2" ;;
    --work) WORK="$2" ;;
    --splitter) SPLITTER="$2" ;;
    --changeq) CHANGEQ="$2" ;;
    --splitter-prompt) SPLIT_PROMPT="$2" ;;
    --changeq-prompt) CHANGEQ_PROMPT="$2" ;;
    --num-samples) NUM_SAMPLES="$2" ;;
    --max-new-tokens) MAX_NEW_TOKENS="$2" ;;
    --batch-size) GEN_BATCH="$2" ;;
    --seed) SEED="$2" ;;
    --question-type) QUESTION_TYPE="$2" ;;
    --gpus) NGPU="$2" ;;
    --policy-server) POLICY_SERVER="$2" ;;
    --labeler-server) LABELER_SERVER="$2" ;;
    --splitter-server) SPLITTER_SERVER="$2" ;;
    --changeq-server) CHANGEQ_SERVER="$2" ;;
    --feedback) FEEDBACK="$2" ;;
    --reward-model) REWARD_MODEL="$2" ;;
    --reward-reference) REWARD_REFERENCE="$2" ;;
    --top-k) TOP_K="$2" ;;
    --max-word-gap) MAX_WORD_GAP="$2" ;;
    --*) EXTRA+=("$1" "$2") ;;
    *) WORK="$1"; shift; continue ;;
  esac
  shift 2
done

# the pipeline with the flags read above and the wrapper's defaults
data_gen_pipeline() {
  : "${PROMPTS:?set --prompts (or PROMPTS)}" "${POLICY:?set --policy (or POLICY)}" "${WORK:?set --work (or WORK)}"
  NGPU=${NGPU:-$({ nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true)}; [ "$NGPU" -gt 0 ] || NGPU=1
  FEEDBACK=${FEEDBACK:-claims}
  ARGS=(--prompts "$PROMPTS" --work-dir "$WORK" --policy "$POLICY" --feedback "$FEEDBACK")
  opt --image-root "${IMAGE_ROOT:-}"
  opt --num-samples "${NUM_SAMPLES:-}"; opt --max-new-tokens "${MAX_NEW_TOKENS:-}"; opt --batch-size "${GEN_BATCH:-}"
  opt --seed "${SEED:-}"; opt --question-type "${QUESTION_TYPE:-}"
  opt --policy-server "${POLICY_SERVER:-}"; opt --labeler-server "${LABELER_SERVER:-}"
  if [ "${TRUST_REMOTE_CODE:-0}" = 1 ]; then ARGS+=(--trust-remote-code); fi
  if [ "$FEEDBACK" = reward ]; then
    opt --reward-model "${REWARD_MODEL:-}"; opt --reward-reference "${REWARD_REFERENCE:-}"
    opt --reward-top-k "${TOP_K:-}"; opt --reward-max-word-gap "${MAX_WORD_GAP:-}"
  else
    opt --labeler "${LABELER:-}"; opt --splitter "${SPLITTER:-}"; opt --changeq "${CHANGEQ:-}"
    opt --splitter-server "${SPLITTER_SERVER:-}"; opt --changeq-server "${CHANGEQ_SERVER:-}"
    # the released split / change-question prompts go with those models only (the rule backends read none)
    if { [ "${SPLITTER:-rule}" != rule ] || [ -n "${SPLITTER_SERVER:-}" ]; } && [ -n "${SPLIT_PROMPT:-}" ]; then
      ARGS+=(--splitter-prompt-file "$SPLIT_PROMPT" --splitter-max-prompt-words 300)
    fi
    if { [ "${CHANGEQ:-rule}" != rule ] || [ -n "${CHANGEQ_SERVER:-}" ]; } && [ -n "${CHANGEQ_PROMPT:-}" ]; then
      ARGS+=(--changeq-prompt-file "$CHANGEQ_PROMPT")
    fi
  fi
  # one process per GPU (torchrun shards the model stages); one process on a CPU, one GPU or a served policy
  RUN=(python -m)
  if [ "$NGPU" -gt 1 ] && [ -z "${POLICY_SERVER:-}" ]; then RUN=(torchrun --standalone --nproc_per_node="$NGPU" -m); fi
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${RUN[@]}" muffin.feedback.pipeline "${ARGS[@]}" "${EXTRA[@]}"; echo; return; fi
  mkdir -p "$WORK"
  echo "data_gen: ${RUN[*]} muffin.feedback.pipeline ${ARGS[*]} ${EXTRA[*]}" >&2
  "${RUN[@]}" muffin.feedback.pipeline "${ARGS[@]}" "${EXTRA[@]}"
}
opt() { if [ -n "${2:-}" ]; then ARGS+=("$1" "$2"); fi; }  # a flag only when its value is set: the pipeline's default else
