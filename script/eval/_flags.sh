#!/usr/bin/env bash
# Shared by script/eval/*.sh (sourced, not run): named-flag parsing and the judge / answer-stage command lines.

# parse_flags "name1 name2 ..." "$@": every --name value becomes the variable NAME (dashes -> underscores).
parse_flags() {
    local allowed=" $1 " name var
    shift
    while [ $# -gt 0 ]; do
        case "$1" in
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
            --*)
                name="${1#--}"
                if [[ "$allowed" != *" $name "* ]]; then
                    echo "unknown flag $1. Available: $(echo $allowed | sed 's/\([^ ]*\)/--\1/g')" >&2; exit 2
                fi
                [ $# -ge 2 ] || { echo "flag $1 needs a value" >&2; exit 2; }
                var=$(echo "$name" | tr 'a-z-' 'A-Z_')
                printf -v "$var" '%s' "$2"
                shift 2 ;;
            *) echo "unexpected argument '$1'; flags are --name value (see --help)" >&2; exit 2 ;;
        esac
    done
}

# require VAR ...: fail with the flag's name when a required flag was not given.
require() {
    local v
    for v in "$@"; do
        [ -n "${!v:-}" ] || { echo "missing required flag --$(echo "$v" | tr 'A-Z_' 'a-z-') (see --help)" >&2; exit 2; }
    done
}

# judge_args: the eval.* judge flags from JUDGE, JUDGE_MODEL, BASE_URL, API_KEY_ENV, CONCURRENCY, PROMPT_FILE,
# JUDGE_MAX_TOKENS, PROTOCOL (paper: the published scoring, the default; ours: lenient, other metric names).
judge_args() {
    JUDGE_ARGS=(--judge "${JUDGE:-openai}")
    [ -n "${JUDGE_MODEL:-}" ] && JUDGE_ARGS+=(--judge-model "$JUDGE_MODEL")
    [ -n "${BASE_URL:-}" ] && JUDGE_ARGS+=(--base-url "$BASE_URL")
    [ -n "${API_KEY_ENV:-}" ] && JUDGE_ARGS+=(--api-key-env "$API_KEY_ENV")
    [ -n "${CONCURRENCY:-}" ] && JUDGE_ARGS+=(--concurrency "$CONCURRENCY")
    [ -n "${PROMPT_FILE:-}" ] && JUDGE_ARGS+=(--prompt-file "$PROMPT_FILE")
    [ -n "${JUDGE_MAX_TOKENS:-}" ] && JUDGE_ARGS+=(--judge-max-tokens "$JUDGE_MAX_TOKENS")
    [ -n "${PROTOCOL:-}" ] && JUDGE_ARGS+=(--protocol "$PROTOCOL")
    return 0
}

# run_answers BENCHMARK QUESTIONS OUT: the answer stage on GPUS processes (torchrun when > 1); skipped with
# --skip-answer 1 (e.g. to rescore answers with another judge).
run_answers() {
    local bench="$1" questions="$2" out="$3" launcher=(python -m eval.answer)
    if [ "${SKIP_ANSWER:-0}" = "1" ]; then echo "skipping the answer stage: using $out"; return 0; fi
    require MODEL_PATH
    [ "${GPUS:-1}" -gt 1 ] && launcher=(torchrun --nproc_per_node "$GPUS" -m eval.answer)
    local extra=()
    [ -n "${IMAGE_ROOT:-}" ] && extra+=(--image-root "$IMAGE_ROOT")
    [ -n "${LORA_PATH:-}" ] && extra+=(--lora-path "$LORA_PATH")
    [ -n "${MAX_NEW_TOKENS:-}" ] && extra+=(--max-new-tokens "$MAX_NEW_TOKENS")
    "${launcher[@]}" --benchmark "$bench" --questions "$questions" --model-path "$MODEL_PATH" \
        --out "$out" --batch-size "${BATCH_SIZE:-8}" "${extra[@]}"
}
