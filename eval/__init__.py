"""Evaluators: Object HalBench (CHAIR), MMHal-Bench and RefoMB, with pluggable judges (API or local HF model).

Two stages per benchmark, each resumable: ``eval.answer`` (a checkpoint answers the questions) and the score
stage (``eval.objhal``, ``eval.mmhal``, ``eval.refomb``), which writes a per-sample JSONL and a results JSON.
"""

from eval.chair import RuleExtractor, chair_summary, load_ground_truth, load_synonyms
from eval.judges import Judge, JudgeFatalError, JudgeRequest, JudgeResponse, OpenAIJudge
from eval.objhal import evaluate_objhal

__all__ = [
    "Judge",
    "JudgeFatalError",
    "JudgeRequest",
    "JudgeResponse",
    "OpenAIJudge",
    "RuleExtractor",
    "chair_summary",
    "evaluate_objhal",
    "load_ground_truth",
    "load_synonyms",
]
