"""Reward-ranked feedback, the backend next to divide-and-conquer: the self-feedback reward (``muffin.reward``) of an
aligned checkpoint against its reference scores every sampled answer, and the released data engine's rules pick
the pairs (chosen in the top 3 by both the sum and the per-token mean, rejected in the bottom 3 by both, within 25
words, near-duplicates dropped).

    python -m muffin.feedback.reward_feedback --answers work/answers.jsonl --prompts prompts.jsonl --image-root DIR \\
        --reward-model CKPT --reward-reference BASE --out work/rewarded.jsonl --pairs-out work/pairs.jsonl

``rewarded.jsonl`` holds each answer with ``reward_sum``, ``reward_mean``, ``reward_tokens`` and ``score`` (the
mean); ``pairs.jsonl`` has the pairs stage's format, so balance, export and the report run on it unchanged.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from muffin.feedback.autocheck import group_by_prompt
from muffin.feedback.pairs import _pair_record, write_jsonl
from muffin.feedback.records import load_prompts, prompts_by_id
from muffin.feedback.stage import (
    KEY,
    ShardedOutput,
    add_overwrite_arg,
    errors_path,
    finish_stage,
    load_records,
    stable_seed,
    whole_file_fingerprint,
)
from muffin.reward import BETA, ENGINE_RULES, PairRules, Reward, SelfReward, reward_pairs
from utils.dist import device_for_rank, is_main, setup_logging, shard
from utils.fingerprint import code_digest, family_identity, sha256_json

logger = logging.getLogger(__name__)


def reward_fingerprint(reward: SelfReward) -> dict[str, Any]:
    """What decides the rewards: both models (weights digests), beta and the code."""
    import muffin.reward

    return {
        "stage": "reward",
        "reward_model": family_identity(reward.aligned),
        "reward_reference": family_identity(reward.reference),
        "beta": reward.beta,
        "code": code_digest(muffin.reward, run_rewards),
    }


def run_rewards(
    reward: SelfReward,
    answers: Sequence[dict[str, Any]],
    prompts: Sequence[Any],
    out_path: str,
    *,
    group_prompts: int = 4,
    overwrite: bool = False,
    wait: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Reward every answer of this rank's prompts (a prompt's answers behind one prefix), resumably; rank 0 returns
    the merged records in input order. An answer that failed an earlier stage is passed on with its error; a prompt
    whose image cannot be read, or whose scoring fails, puts its answers in the errors file."""
    by_id = prompts_by_id(list(prompts))
    inputs = {}  # an answer is rewarded again when its record or its prompt's image changed
    for r in answers:
        prompt = by_id.get(r.get("prompt_id"))
        inputs[r[KEY]] = sha256_json({"record": r, "image": prompt.image_sha256() if prompt else None})
    out = ShardedOutput(out_path, fingerprint=reward_fingerprint(reward), inputs=inputs, overwrite=overwrite)
    groups = [g for g in shard(group_by_prompt(answers)) if any(r[KEY] not in out.done for r in g)]
    logger.info("reward: %d prompts to score on this rank (%d answers already done)", len(groups), len(out.done))
    for start in tqdm(range(0, len(groups), group_prompts), desc="reward", disable=not progress):
        _score_groups(reward, groups[start : start + group_prompts], by_id, out)
    return out.finalize(order=[r[KEY] for r in answers], wait=wait)


def _score_groups(reward: SelfReward, groups: list[list[dict[str, Any]]], by_id: dict, out: ShardedOutput) -> None:
    batch, recs = [], []
    for group in groups:
        ok = [r for r in group if not r.get("error") and isinstance(r.get("answer"), str)]
        for r in group:
            if r not in ok:
                out.write(r)  # failed upstream: passed on, its error already recorded there
        if not ok:
            continue
        prompt = by_id.get(group[0].get("prompt_id"))
        try:
            if prompt is None:
                raise ValueError(f"prompt '{group[0].get('prompt_id')}' is not in --prompts")
            image = prompt.load_image()
        except (OSError, ValueError) as e:
            for r in ok:
                out.error(r[KEY], "reward", str(e))
                out.write({**r, "error": {"stage": "reward", "reason": str(e)}})
            continue
        batch.append((image, ok[0]["question"], [r["answer"] for r in ok]))
        recs.append(ok)
    if not batch:
        return
    try:
        scored = reward.score_groups(batch)
    except (ValueError, RuntimeError) as e:  # one prompt's fault: score them one by one
        scored = []
        for item, ok in zip(batch, recs):
            try:
                scored.extend(reward.score_groups([item]))
            except (ValueError, RuntimeError) as err:
                reason = f"{type(err).__name__}: {err}"
                for r in ok:
                    out.error(r[KEY], "reward", reason)
                scored.append(None)
        logger.warning("reward: a batch failed (%s); scored its prompts one by one", e)
    for ok, rewards in zip(recs, scored):
        if rewards is None:
            for r in ok:
                out.write({**r, "error": {"stage": "reward", "reason": "scoring failed (errors file)"}})
            continue
        for r, rw in zip(ok, rewards):
            out.write({**r, **rw.as_dict(), "score": rw.mean, "labeler": "reward"})


def build_reward_pairs(
    records: Sequence[dict[str, Any]], rules: PairRules = ENGINE_RULES, *, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs of every prompt by ``muffin.reward.reward_pairs`` in the pairs stage's format, and statistics."""
    pairs: list[dict[str, Any]] = []
    stats: dict[str, Any] = {"prompts": 0, "answers": len(records), "answers_failed": 0, "prompts_without_pairs": 0,
                             "pairs_per_prompt": {}}  # fmt: skip
    for group in group_by_prompt(records):
        stats["prompts"] += 1
        usable = [r for r in group if not r.get("error") and "reward_sum" in r]
        stats["answers_failed"] += len(group) - len(usable)
        rewards = [Reward(r["reward_sum"], r["reward_mean"], []) for r in usable]
        chosen = reward_pairs([r["answer"] for r in usable], rewards, rules,
                              seed=stable_seed("reward-pairs", seed, group[0].get("prompt_id")))  # fmt: skip
        stats["pairs_per_prompt"][len(chosen)] = stats["pairs_per_prompt"].get(len(chosen), 0) + 1
        stats["prompts_without_pairs"] += not chosen
        pairs.extend(_pair_record(group[0]["prompt_id"], n, usable[i], usable[j]) for n, (i, j) in enumerate(chosen))
    stats["pairs"] = len(pairs)
    return pairs, stats


def write_pairs(
    records: Sequence[dict[str, Any]], out: str, rules: PairRules, seed: int, started: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The reward pairs of ``records`` into ``out`` with its manifest (a cheap whole-file step: rank 0); returns the
    pairs and the manifest's counts."""
    pair_recs, stats = build_reward_pairs(records, rules, seed=seed)
    write_jsonl(out, pair_recs)
    write_jsonl(str(errors_path(out)), [])
    settings = {"rules": vars(rules), "seed": seed}
    counts = finish_stage(out, stage="reward_pairs", config=settings, counts=stats, started=started, inputs={},
                          fingerprint=whole_file_fingerprint("reward_pairs", inputs={"rewarded": list(records)},
                                                             settings=settings, code=code_digest(build_reward_pairs)))  # fmt: skip
    return pair_recs, counts


def add_rule_args(p: argparse.ArgumentParser) -> None:
    """The pair rules' flags (defaults: the released data engine)."""
    d = PairRules()
    p.add_argument(
        "--top-k", type=int, default=d.top_k, help="chosen from the top k by sum and mean, rejected from the bottom k"
    )
    p.add_argument(
        "--max-word-gap", type=int, default=d.max_word_gap, help="chosen and rejected differ by fewer words"
    )
    p.add_argument(
        "--duplicate-threshold",
        type=float,
        default=d.duplicate_threshold,
        help="word 10-gram Jaccard above which an answer is a near-duplicate",
    )
    p.add_argument("--max-pairs", type=int, default=None, help="pairs per prompt at most (default: every qualifying pair)")  # fmt: skip


def rules_of(args: argparse.Namespace) -> PairRules:
    return PairRules(top_k=args.top_k, max_word_gap=args.max_word_gap, duplicate_threshold=args.duplicate_threshold,
                     max_pairs=args.max_pairs)  # fmt: skip


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Reward-ranked feedback: self-feedback rewards and the engine's pairs.")
    p.add_argument("--answers", required=True, help="generate stage output")
    p.add_argument("--prompts", required=True, help="the prompts file generate read")
    p.add_argument("--image-root", default=None)
    p.add_argument("--reward-model", required=True, help="the aligned checkpoint (e.g. RLAIF-V 7B)")
    p.add_argument("--reward-reference", required=True, help="the checkpoint it was aligned from (e.g. LLaVA 1.5 7B)")
    p.add_argument("--beta", type=float, default=BETA)
    p.add_argument("--out", required=True, help="rewarded answers JSONL")
    p.add_argument("--pairs-out", required=True, help="pairs JSONL (the pairs stage's format)")
    p.add_argument("--seed", type=int, default=0, help="order of each prompt's pairs")
    p.add_argument("--batch-size", type=int, default=8, help="answers per forward pass")
    p.add_argument("--dtype", default=None)
    add_rule_args(p)
    add_overwrite_arg(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = make_parser().parse_args(argv)
    started = time.time()
    answers = load_records(args.answers, "generate")
    prompts, _ = load_prompts(args.prompts, args.image_root)
    device = device_for_rank()
    reward = SelfReward(args.reward_model, args.reward_reference, beta=args.beta, batch_size=args.batch_size,
                        device=device, dtype=args.dtype)  # fmt: skip
    rewarded = run_rewards(reward, answers, prompts, args.out, overwrite=args.overwrite)
    if not is_main() or rewarded is None:
        return
    finish_stage(args.out, stage="reward", config=vars(args), counts={"answers": len(rewarded)}, started=started,
                 inputs={"answers": args.answers, "prompts": args.prompts})  # fmt: skip
    write_pairs(rewarded, args.pairs_out, rules_of(args), args.seed, started)


if __name__ == "__main__":
    main()
