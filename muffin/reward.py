"""Self-feedback reward of RLAIF-V (CVPR 2025 version): an aligned policy and its reference define a reward, used for
best-of-N answers at inference and for reward-ranked preference pairs.

Per answer token t: r_t = beta * (log pi_aligned(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)), beta 0.1; an answer's
reward is the sum over its tokens (answer + end-of-turn) and its per-token average (the length-normalised score the
paper's best-of-N ranks by). The released data engine multiplies the average by 0.1 a second time; we do not.

    python -m muffin.reward --reward-model RLAIF-V-7B --reward-reference llava-v1.5-7b --image car.jpg \
        --question "Why did the car stop?" --answer "A sheep is crossing." --answer "The light is red."
"""

from __future__ import annotations

import argparse
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from muffin.decoding import Decoding
from muffin.family import ModelFamily, Sample, load_family
from muffin.inference import AnswerLogps, answer_logps, generate

logger = logging.getLogger(__name__)

BETA = 0.1  # the data engine's scale of the log-ratio (the DPO beta of the aligned model)


@dataclass(frozen=True)
class Reward:
    """An answer's reward: ``sum`` and ``mean`` over its ``per_token`` rewards (answer tokens + end-of-turn)."""

    sum: float
    mean: float
    per_token: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"reward_sum": self.sum, "reward_mean": self.mean, "reward_tokens": len(self.per_token)}


def token_rewards(
    aligned: Sequence[AnswerLogps], reference: Sequence[AnswerLogps], beta: float = BETA
) -> list[Reward]:
    """Rewards from the two models' answer log-probs (same answers, same order). The answers must be tokenised alike
    by both models: a different token count means their tokenizers disagree on that answer, which is refused."""
    if len(aligned) != len(reference):
        raise ValueError(
            f"got log-probs of {len(aligned)} answers from the aligned model, {len(reference)} from the reference"
        )
    out = []
    for i, (a, r) in enumerate(zip(aligned, reference)):
        if len(a.per_token) != len(r.per_token):
            raise ValueError(
                f"answer {i}: the aligned model reads {len(a.per_token)} tokens, the reference {len(r.per_token)}; "
                "their tokenizers split this answer differently, so per-token rewards are undefined"
            )
        per = [beta * (x - y) for x, y in zip(a.per_token, r.per_token)]
        total = sum(per)
        out.append(Reward(total, total / max(len(per), 1), per))
    return out


def check_tokenizers(aligned: ModelFamily, reference: ModelFamily) -> None:
    """Refuse two families whose tokenizers differ (the per-token log-ratio needs the same tokens). Two checkpoints
    of one family pass when their vocabularies are equal; of different families, too (their chat templates may
    differ, their answer tokens may not)."""
    va, vr = aligned.tokenizer.get_vocab(), reference.tokenizer.get_vocab()
    if va != vr:
        only_a = len(set(va) - set(vr))
        only_r = len(set(vr) - set(va))
        raise ValueError(
            f"the aligned model ({aligned.name}) and the reference ({reference.name}) have different tokenizers "
            f"({len(va)} vs {len(vr)} tokens; {only_a} only in the aligned one, {only_r} only in the reference): "
            "the reward compares the two models token by token, so pick a reference with the aligned model's "
            "tokenizer (its instruct base)"
        )


class SelfReward:
    """The reward of an aligned checkpoint against its reference.

    Args:
        aligned / reference: checkpoint directories or loaded families.
        beta: scale of the log-ratio (0.1, as the released data engine).
        batch_size: answers per forward pass; a question's answers share one image + prompt encoding.

    Example:
        >>> rm = SelfReward("checkpoints/RLAIF-V-7B", "checkpoints/llava-v1.5-7b")  # doctest: +SKIP
        >>> rm.score("car.jpg", "Why did the car stop?", ["A sheep crosses.", "The light is red."])  # doctest: +SKIP
    """

    def __init__(
        self,
        aligned: ModelFamily | str | Path,
        reference: ModelFamily | str | Path,
        *,
        beta: float = BETA,
        batch_size: int = 8,
        device: str | None = None,
        dtype: Any = None,
    ) -> None:
        self.aligned = (
            aligned if isinstance(aligned, ModelFamily) else load_family(aligned, device=device, dtype=dtype)
        )
        self.reference = (
            reference if isinstance(reference, ModelFamily) else load_family(reference, device=device, dtype=dtype)
        )
        check_tokenizers(self.aligned, self.reference)
        self.beta = beta
        self.batch_size = batch_size

    def score(self, image: Image.Image | str | Path | None, question: str, answers: Sequence[str]) -> list[Reward]:
        """Rewards of ``answers`` to ``question`` about ``image`` (a PIL image, path or base64 string)."""
        return self.score_groups([(image, question, list(answers))])[0]

    def score_groups(
        self, groups: Sequence[tuple[Image.Image | str | Path | None, str, Sequence[str]]], *, progress: bool = False
    ) -> list[list[Reward]]:
        """Rewards for several questions at once; each question's answers go through one shared prefix (one image and
        prompt encoding, every answer behind it) in both models."""
        from utils.images import load_image

        samples: list[Sample] = []
        sizes = []
        for image, question, answers in groups:
            img = image if image is None or isinstance(image, Image.Image) else load_image(image, what="reward image")
            samples.extend(Sample(img, question, a) for a in answers)  # one image object: packed behind one prefix
            sizes.append(len(answers))
        kw = {"batch_size": self.batch_size, "progress": progress}
        rewards = token_rewards(
            answer_logps(self.aligned, samples, **kw), answer_logps(self.reference, samples, **kw), self.beta
        )
        out, start = [], 0
        for n in sizes:
            out.append(rewards[start : start + n])
            start += n
        return out


def reward_for(
    policy: ModelFamily | None,
    policy_path: str | Path,
    reward_model: str | Path | None,
    reward_reference: str | Path | ModelFamily,
    *,
    policy_lora: str | Path | None = None,
    dtype: Any = None,
    device: str | None = None,
    **kwargs: Any,
) -> SelfReward:
    """The reward of ``reward_model`` against ``reward_reference``. Without ``reward_model`` the aligned model is the
    policy as it answers, its LoRA (``policy_lora``) merged: the loaded ``policy`` when given, else loaded from
    ``policy_path``. A ``reward_model`` naming the policy's checkpoint reuses the loaded policy only when no LoRA is
    merged into it (the named checkpoint is the base without the adapter)."""
    if reward_model is None:
        aligned: ModelFamily | str | Path = (
            policy
            if policy is not None
            else load_family(policy_path, lora_path=policy_lora, dtype=dtype, device=device)
        )
    elif policy is not None and policy_lora is None and Path(reward_model).resolve() == Path(policy_path).resolve():
        aligned = policy
    else:
        aligned = reward_model
    return SelfReward(aligned, reward_reference, dtype=dtype, device=device, **kwargs)


RANK_KEYS = ("mean", "sum")


def best_index(rewards: Sequence[Reward], by: str = "mean") -> int:
    """Index of the best answer by ``by`` (``mean``: the per-token average the paper ranks by, or ``sum``); the first
    of equals."""
    if by not in RANK_KEYS:
        raise ValueError(f"unknown ranking '{by}'. Available: {', '.join(RANK_KEYS)}")
    values = [getattr(r, by) for r in rewards]
    return max(range(len(values)), key=values.__getitem__)


@dataclass
class BestOfN:
    """The chosen answer with every candidate and its reward."""

    answer: str
    index: int
    candidates: list[str]
    rewards: list[Reward]


def best_of_n(
    policy: ModelFamily,
    reward: SelfReward,
    image: Image.Image | str | Path | None,
    question: str,
    n: int,
    decoding: Decoding,
    *,
    seed: int = 0,
    by: str = "mean",
) -> BestOfN:
    """Sample ``n`` answers in one batched generate call (the prompt prefilled once: ``muffin.fast.generation``), score them
    with ``reward`` and return the best. Seeds ``seed .. seed + n - 1``: the same call gives the same answer."""
    from utils.images import load_image

    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1, got {n}")
    if not decoding.do_sample and n > 1:
        raise ValueError("best-of-N needs a sampling decoding (do_sample=True); greedy gives n equal answers")
    img = image if image is None or isinstance(image, Image.Image) else load_image(image, what="best-of-N image")
    samples = [Sample(img, question)] * n
    candidates = generate(policy, samples, decoding, seeds=[seed + i for i in range(n)], batch_size=n)
    rewards = reward.score(img, question, candidates)
    k = best_index(rewards, by)
    return BestOfN(candidates[k], k, candidates, rewards)


# --- reward-ranked pairs (the released data engine's rules, configurable) ---------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def word_count(text: str) -> int:
    """Words and punctuation marks, as a Treebank-style tokenizer counts them (the engine uses NLTK's)."""
    return len(_WORD.findall(text))


def _ngrams(text: str, n: int) -> set[str]:
    words = _WORD.findall(text)
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def drop_near_duplicates(texts: Sequence[str], threshold: float = 0.9, n: int = 10) -> list[int]:
    """Indices kept, in order: a text whose word ``n``-gram Jaccard similarity with a kept one exceeds ``threshold``
    is dropped (texts shorter than ``n`` words have no n-grams and are never duplicates, as in the engine)."""
    kept: list[int] = []
    seen: list[set[str]] = []
    for i, t in enumerate(texts):
        grams = _ngrams(t, n)
        if any(grams and s and len(grams & s) / len(grams | s) > threshold for s in seen):
            continue
        kept.append(i)
        seen.append(grams)
    return kept


@dataclass(frozen=True)
class PairRules:
    """How reward-ranked pairs are formed from one prompt's answers (defaults: the released data engine)."""

    top_k: int = 3  # chosen among the top k by both sum and mean; rejected among the bottom k by both
    max_word_gap: int = 25  # |words(chosen) - words(rejected)| < max_word_gap
    duplicate_threshold: float = 0.9  # near-duplicates (word 10-gram Jaccard above this) are dropped first
    ngram: int = 10
    max_pairs: int | None = None  # cap per prompt (None: every qualifying pair, as the engine)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_word_gap < 1:
            raise ValueError(f"max_word_gap must be >= 1, got {self.max_word_gap}")
        if not 0 < self.duplicate_threshold <= 1:
            raise ValueError(f"duplicate_threshold must be in (0, 1], got {self.duplicate_threshold}")


ENGINE_RULES = PairRules()  # the released data engine's settings


def reward_pairs(
    answers: Sequence[str], rewards: Sequence[Reward], rules: PairRules = ENGINE_RULES, *, seed: int = 0
) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of one prompt's answers.

    As the released engine: rank by sum and by mean (each list with near-duplicates dropped); chosen = in the top
    ``top_k`` of both, rejected = in the bottom ``top_k`` of both; every chosen x rejected within ``max_word_gap``
    words is a pair. Unlike it, an answer never pairs with itself (with fewer than 2 * top_k answers the top and
    bottom overlap) and the chosen must have a strictly higher sum and mean. Order: shuffled with ``seed``."""
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    ranked = {}
    for key in RANK_KEYS:
        order = sorted(range(len(answers)), key=lambda i: getattr(rewards[i], key), reverse=True)
        kept = drop_near_duplicates([answers[i] for i in order], rules.duplicate_threshold, rules.ngram)
        ranked[key] = [order[j] for j in kept]
    k = rules.top_k
    top = [i for i in ranked["sum"][:k] if i in ranked["mean"][:k]]
    bottom = [i for i in ranked["sum"][-k:] if i in ranked["mean"][-k:]]
    words = [word_count(a) for a in answers]
    pairs = [
        (c, r)
        for c in top
        for r in bottom
        if c != r
        and rewards[c].sum > rewards[r].sum
        and rewards[c].mean > rewards[r].mean
        and abs(words[c] - words[r]) < rules.max_word_gap
    ]
    random.Random(seed).shuffle(pairs)
    return pairs[: rules.max_pairs] if rules.max_pairs is not None else pairs


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Self-feedback rewards of answers to one question about one image.")
    p.add_argument("--reward-model", required=True, help="the aligned checkpoint")
    p.add_argument("--reward-reference", required=True, help="the checkpoint it was aligned from")
    p.add_argument("--image", required=True, help="image path, data URL or base64")
    p.add_argument("--question", required=True)
    p.add_argument("--answer", action="append", required=True, help="an answer to score (repeat for several)")
    p.add_argument("--beta", type=float, default=BETA)
    p.add_argument("--per-token", action="store_true", help="also print each token's reward")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m muffin.reward --reward-model A --reward-reference B --image X --question Q --answer ...``: one JSON
    line per answer (sum, per-token mean, tokens), the best by mean marked."""
    import json

    args = make_parser().parse_args(argv)
    rm = SelfReward(args.reward_model, args.reward_reference, beta=args.beta, device=args.device, dtype=args.dtype)
    rewards = rm.score(args.image, args.question, args.answer)
    best = best_index(rewards)
    for i, (a, r) in enumerate(zip(args.answer, rewards)):
        rec = {"answer": a, **r.as_dict(), "best": i == best}
        if args.per_token:
            rec["per_token"] = r.per_token
        print(json.dumps(rec, ensure_ascii=False))


if __name__ == "__main__":
    main()
