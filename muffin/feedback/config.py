"""The one config of the feedback stages' knobs (``FeedbackConfig``): each field is a ``--flag`` of
``muffin.feedback.pipeline``, a key of the loop's JSON config (``muffin.loop.LoopConfig``) and, for the common ones,
a flag of the ``script/data_gen`` launcher; it is validated here once. ``muffin.feedback.stages`` reads it.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from muffin.decoding import CANDIDATE_SAMPLING
from muffin.feedback.autocheck import SCORES

logger = logging.getLogger(__name__)

FEEDBACK = ("claims", "reward")  # claims: divide-and-conquer (the paper); reward: reward-ranked (muffin.reward)

# Old names still read (with a warning naming the new one): pipeline flags and loop keys users have in scripts,
# configs and run directories.
RENAMED = {
    "split_prompt_file": "splitter_prompt_file",
    "split_max_prompt_words": "splitter_max_prompt_words",
}


def knob(default: Any, help: str) -> Any:
    """A config field with its help text (the CLI flag's help); ``MISSING``: required."""
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class FeedbackConfig:
    """Every knob of the feedback stages (generate -> divide -> changeq -> autocheck -> pairs -> balance -> export, or
    generate -> reward -> pairs -> ...). Keyword-only: ``FeedbackConfig(prompts=..., policy=...)``."""

    prompts: str = knob(MISSING, "input JSONL (ds_question_id, image_path|image, question)")
    image_root: str | None = knob(None, "directory that relative image_path values start from")
    policy: str = knob(MISSING, "the policy checkpoint that answers (with --policy-server: its name)")
    labeler: str = knob(
        "initial",
        "who answers the claims' yes/no questions: 'initial' (the policy the run starts from: self-feedback), "
        "'policy' (the loop's policy of each round), 'oracle' (a world's ground truth, the loop's truth hook) "
        "or a VLM checkpoint",
    )
    splitter: str = knob("rule", "divide: 'rule' (offline) or a chat-LM checkpoint that splits answers into claims")
    splitter_prompt_file: str | None = knob(
        None, "divide: prompt template with {question} and {answer} (default: ours; the released model's: "
        "prompt-split-facts, python -m utils.fetch)"
    )  # fmt: skip
    splitter_max_prompt_words: int | None = knob(
        None, "divide: cut the filled prompt to N words (300 for the released split model)"
    )
    changeq: str = knob("rule", "changeq: 'rule' or a chat-LM checkpoint that turns claims into yes/no questions")
    changeq_prompt_file: str | None = knob(None, "changeq: prompt template (default: ours)")
    text_max_new_tokens: int = knob(512, "divide / changeq: tokens a chat-LM backend may write")
    num_samples: int = knob(10, "answers sampled per prompt (paper: 10); pairs need at least 2")
    temperature: float = knob(CANDIDATE_SAMPLING.temperature, "sampling temperature of the answers (paper: 0.7)")
    max_new_tokens: int = knob(CANDIDATE_SAMPLING.max_new_tokens, "tokens an answer may have")
    seed: int = knob(0, "run seed: each answer's sampling seed and the pair draws derive from it")
    batch_size: int = knob(8, "answers per generate batch (also divide / changeq / reward batches)")
    labeler_batch_size: int = knob(0, "questions per labeler pass; 0: 256 where the labeler packs, else 16")
    question_template: str = knob("{question}", "wraps each yes/no question, e.g. '{question} Answer yes or no.'")
    score: str = knob(
        "count", "answer score: count (RLAIF-V: -claims judged false) or expected (-sum of P(no) / (P(yes) + P(no)))"
    )
    max_pairs: int = knob(2, "pairs kept per prompt (paper: 2)")
    min_diff: float = knob(1, "smallest score gap of a pair; with score 'expected' a fraction such as 0.5")
    drop_zero_claims: bool = knob(False, "leave answers with no claims out of the pairs")
    balance: bool = knob(True, "balance chosen/rejected lengths (false: keep every pair)")
    ds_name: str = knob("RLAIF-V", "export: ds_name column of the dataset")
    question_type: str = knob("detailed_description", "export: the question type recorded in origin_split")
    feedback: str = knob("claims", "claims: divide-and-conquer (the paper); reward: reward-ranked (muffin.reward)")
    reward_model: str | None = knob(None, "reward: the aligned checkpoint whose reward ranks (default: the policy)")
    reward_reference: str = knob(
        "initial", "reward: the checkpoint the reward model was aligned from ('initial': the run's first policy)"
    )
    reward_top_k: int = knob(3, "reward: chosen among the top k by sum and mean, rejected among the bottom k")
    reward_max_word_gap: int = knob(25, "reward: chosen and rejected differ by fewer words than this")
    # models behind OpenAI-compatible servers (comma-separated base URLs; docs/SERVING.md) instead of checkpoints
    policy_server: str | None = knob(None, "serve the policy (pipeline only: the loop trains it every round)")
    labeler_server: str | None = knob(None, "serve the labeler (default with a policy server and labeler 'initial')")
    labeler_top_logprobs: int = knob(20, "served labeler: first-token alternatives read for P(yes), P(no)")
    splitter_server: str | None = knob(None, "serve the divide model")
    changeq_server: str | None = knob(None, "serve the changeq model")
    server_concurrency: int = knob(16, "requests in flight per served stage")
    dtype: str | None = knob(None, "dtype the checkpoints load in (default: the family's)")
    device: str | None = knob(None, "device (default: this rank's GPU, else the CPU)")
    trust_remote_code: bool = knob(False, "run code shipped with the policy/labeler checkpoints (opt-in; MiniCPM-V)")

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, fix: str) -> ValueError:
            return ValueError(f"{name} (--{name.replace('_', '-')}) = {value!r}: {fix}")

        if self.feedback not in FEEDBACK:
            raise bad("feedback", self.feedback, f"unknown feedback. Available: {', '.join(FEEDBACK)}")
        if self.num_samples < 2:
            raise bad("num_samples", self.num_samples, "must be >= 2 to form pairs (paper: 10)")
        if self.score not in SCORES:
            raise bad(
                "score", self.score, f"unknown answer score. Available: {', '.join(SCORES)} (count: the paper's)"
            )
        if not self.min_diff > 0:
            raise bad("min_diff", self.min_diff, "must be > 0 (answers with equal scores make no pair)")
        for name in ("max_pairs", "batch_size", "server_concurrency", "text_max_new_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "must be >= 1")
        if self.labeler_batch_size < 0:
            raise bad("labeler_batch_size", self.labeler_batch_size, "must be >= 0 (0: the labeler's default)")
        if "{question}" not in self.question_template:
            raise bad("question_template", self.question_template, "needs the {question} slot")
        for name in ("splitter_prompt_file", "changeq_prompt_file"):  # a file, or a name of utils.fetch's registry
            if getattr(self, name):
                from utils.fetch import resolve_file

                try:
                    setattr(self, name, str(resolve_file(getattr(self, name))))
                except FileNotFoundError as e:
                    raise bad(name, getattr(self, name), str(e)) from e
        if self.feedback == "reward" and self.reward_model is None and self.reward_reference == "initial":
            raise ValueError(
                "feedback 'reward' needs reward_model (--reward-model) or reward_reference (--reward-reference): "
                "with neither, the aligned model and its reference are both the initial policy and every reward is 0"
            )

    @classmethod
    def knobs(cls) -> tuple[str, ...]:
        """The stage knobs' names (``FeedbackConfig``'s own fields, not a subclass's)."""
        return tuple(f.name for f in fields(FeedbackConfig))


def renamed_keys(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``raw`` with old knob names (``RENAMED``) replaced by the new ones, warning once per name; refuses both."""
    out = dict(raw)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"{where}: '{old}' is the old name of '{new}'; keep only '{new}'")
        logger.warning("%s: '%s' is deprecated, read as '%s' (rename it; the old name will go)", where, old, new)
        out[new] = out.pop(old)
    return out
