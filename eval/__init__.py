"""Evaluators: Object HalBench (CHAIR), MMHal-Bench and RefoMB with pluggable judges (API or local HF model), and
the judge-free AMBER and POPE.

Two stages per benchmark, each resumable: ``eval.answer`` (a checkpoint answers the questions) and the score
stage (``eval.objhal``, ``eval.mmhal``, ``eval.refomb``, ``eval.amber``, ``eval.pope``), which writes a per-sample
JSONL and a results JSON.
Names are imported on first use, so ``python -m eval.<stage>`` runs its module once, without a second copy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RuleExtractor": "eval.chair",
    "chair_summary": "eval.chair",
    "load_ground_truth": "eval.chair",
    "load_synonyms": "eval.chair",
    "Judge": "eval.judges",
    "JudgeFatalError": "eval.judges",
    "JudgeRequest": "eval.judges",
    "JudgeResponse": "eval.judges",
    "hf_judge": "eval.judges",
    "openai_judge": "eval.judges",
    "evaluate_objhal": "eval.objhal",
    "evaluate_amber": "eval.amber",
    "evaluate_pope": "eval.pope",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
