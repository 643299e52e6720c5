"""The RLAIF-V feedback data pipeline: generate, divide, change question, autocheck, pairs, balance, export.

Each stage is a module with a pure core, a ``run_*`` function for notebooks and a CLI
(``python -m muffin.feedback.<stage> --help``); ``muffin.feedback.stages`` is their table (knobs in
``muffin.feedback.config``), which ``muffin.feedback.pipeline`` and ``muffin.loop`` both run.
"""

from muffin.feedback.rules import claim_to_question_rule, split_claims_rule

__all__ = ["claim_to_question_rule", "split_claims_rule"]
