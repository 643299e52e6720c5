#!/usr/bin/env bash
# Sourced by the divide-and-conquer data_gen scripts after their variables (POLICY, LABELER, SPLITTER, CHANGEQ,
# SPLIT_PROMPT, CHANGEQ_PROMPT, RUN): each stage's model arguments and launcher.
# The released split / change-question prompts go with those models only (the rule backends read none; an empty
# prompt variable: our prompt). POLICY_SERVER, LABELER_SERVER, SPLITTER_SERVER, CHANGEQ_SERVER (base URLs,
# comma-separated) run that stage on served models instead of checkpoints, as one process (docs/SERVING.md).
SPLIT_ARGS=(); { [ "$SPLITTER" != rule ] || [ -n "${SPLITTER_SERVER:-}" ]; } && [ -n "$SPLIT_PROMPT" ] && SPLIT_ARGS+=(--prompt-file "$SPLIT_PROMPT" --max-prompt-words 300)
CHANGEQ_ARGS=(); { [ "$CHANGEQ" != rule ] || [ -n "${CHANGEQ_SERVER:-}" ]; } && [ -n "$CHANGEQ_PROMPT" ] && CHANGEQ_ARGS+=(--prompt-file "$CHANGEQ_PROMPT")
POLICY_ARGS=(--policy "$POLICY"); GEN_RUN=$RUN
[ -n "${POLICY_SERVER:-}" ] && { POLICY_ARGS=(--policy-server "$POLICY_SERVER"); GEN_RUN=python; }
LABELER_ARGS_SRV=(--labeler "$LABELER"); CHECK_RUN=$RUN
[ -n "${LABELER_SERVER:-}" ] && { LABELER_ARGS_SRV=(--labeler-server "$LABELER_SERVER"); CHECK_RUN=python; }
SPLIT_RUN=$RUN; [ -n "${SPLITTER_SERVER:-}" ] && { SPLIT_ARGS+=(--splitter-server "$SPLITTER_SERVER"); SPLIT_RUN=python; }
CHANGEQ_RUN=$RUN; [ -n "${CHANGEQ_SERVER:-}" ] && { CHANGEQ_ARGS+=(--changeq-server "$CHANGEQ_SERVER"); CHANGEQ_RUN=python; }
true
