"""Stage 5, pairs: (chosen, rejected) answer pairs from the labeler's verdicts.

    python -m muffin.feedback.pairs --checked work/checked.jsonl --out work/pairs.jsonl --max-pairs 2 --seed 0

RLAIF-V sec. 3.1: score = -(number of claims judged false); every two answers of one prompt whose scores differ by
at least ``min_diff`` form a candidate pair, the higher score chosen; at most ``max_pairs`` candidates per prompt
are kept, sampled with a seed derived from (run seed, prompt id). Answers that failed an earlier stage are left
out and counted; answers with zero claims score 0 and are listed in the manifest (``--drop-zero-claims`` leaves
them out). A cheap whole-file stage: rank 0 computes it, the output is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Sequence
from itertools import combinations
from typing import Any

from muffin.feedback.autocheck import group_by_prompt
from muffin.feedback.records import field_problem
from muffin.feedback.stage import (
    errors_path,
    finish_stage,
    load_records,
    stable_seed,
    whole_file_fingerprint,
)
from utils.dist import is_main, setup_logging
from utils.fingerprint import code_digest
from utils.io import atomic_write_text

logger = logging.getLogger(__name__)


PAIR_FIELDS = {
    "prompt_id": "text",
    "answer_id": "text",
    "question": "text",
    "answer": "text",
    "score": "number",
    "verdicts": "flags",
}


def candidate_pairs(scores: Sequence[float], min_diff: float = 1) -> list[tuple[int, int]]:
    """All (chosen, rejected) index pairs with ``score[chosen] - score[rejected] >= min_diff``, in (i, j) order.

    Example:
        >>> candidate_pairs([0, -2, 0, -1])
        [(0, 1), (0, 3), (2, 1), (3, 1), (2, 3)]
    """
    out = []
    for i, j in combinations(range(len(scores)), 2):
        if abs(scores[i] - scores[j]) >= min_diff:
            out.append((i, j) if scores[i] > scores[j] else (j, i))
    return out


def sample_pairs(cands: Sequence[tuple[int, int]], k: int, seed: int) -> list[tuple[int, int]]:
    """At most ``k`` candidates, drawn without replacement with ``random.Random(seed)``, kept in candidate order."""
    if len(cands) <= k:
        return list(cands)
    picked = sorted(random.Random(seed).sample(range(len(cands)), k))
    return [cands[i] for i in picked]


def _pair_record(prompt_id: str, n: int, ch: dict[str, Any], rej: dict[str, Any]) -> dict[str, Any]:
    return {
        "pair_id": f"{prompt_id}#pair{n}",
        "prompt_id": prompt_id,
        "question": ch["question"],
        "image_path": ch.get("image_path"),
        "chosen": ch["answer"],
        "rejected": rej["answer"],
        "chosen_id": ch["answer_id"],
        "rejected_id": rej["answer_id"],
        "chosen_score": ch["score"],
        "rejected_score": rej["score"],
        "policy": ch.get("policy"),
        "labeler": ch.get("labeler"),
    }


def build_pairs(
    records: Sequence[dict[str, Any]],
    *,
    max_pairs: int = 2,
    min_diff: float = 1,
    seed: int = 0,
    drop_zero_claims: bool = False,
    errors: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs of every prompt (prompts in input order) and the statistics for the manifest and the report.

    A record whose fields are damaged (no ``score``, ``verdicts`` not a list, ...) is left out, counted in
    ``answers_malformed`` and appended to ``errors`` as ``{"id", "stage": "pairs", "reason"}`` naming it.
    """
    if not min_diff > 0:
        raise ValueError(f"min_diff must be > 0 (answers with equal scores make no pair), got {min_diff}")
    errors = [] if errors is None else errors
    pairs: list[dict[str, Any]] = []
    stats: dict[str, Any] = {
        "prompts": 0,
        "answers": len(records),
        "answers_failed": 0,
        "answers_malformed": 0,
        "zero_claim_answers": [],
        "prompts_without_pairs": 0,
        "pairs_per_prompt": {},
        "score_spread": [],
    }
    for group in group_by_prompt(records):
        if group[0].get("prompt_id") is None:  # records with no prompt_id: each reported, no prompt to pair
            for r in group:
                stats["answers_malformed"] += 1
                reason = f"record '{r.get('answer_id')}': field 'prompt_id' is missing; it is written by generate"
                errors.append({"id": r.get("answer_id"), "stage": "pairs", "reason": reason})
            continue
        stats["prompts"] += 1
        usable = []
        for r in group:
            problem = None if r.get("error") else field_problem(r, PAIR_FIELDS, "autocheck")
            if r.get("error"):
                stats["answers_failed"] += 1
            elif problem is not None:
                stats["answers_malformed"] += 1
                reason = f"record '{r.get('answer_id')}': {problem}"
                logger.warning("pairs: %s", reason)
                errors.append({"id": r.get("answer_id"), "stage": "pairs", "reason": reason})
            elif not r["verdicts"]:
                stats["zero_claim_answers"].append(r["answer_id"])
                if not drop_zero_claims:
                    usable.append(r)
            else:
                usable.append(r)
        scores = [r["score"] for r in usable]
        stats["score_spread"].append(max(scores) - min(scores) if scores else 0)
        chosen = sample_pairs(
            candidate_pairs(scores, min_diff), max_pairs, stable_seed("pairs", seed, group[0]["prompt_id"])
        )
        stats["pairs_per_prompt"][len(chosen)] = stats["pairs_per_prompt"].get(len(chosen), 0) + 1
        stats["prompts_without_pairs"] += not chosen
        pairs.extend(_pair_record(group[0]["prompt_id"], n, usable[i], usable[j]) for n, (i, j) in enumerate(chosen))
    stats["pairs"] = len(pairs)
    if stats["zero_claim_answers"]:
        logger.warning(
            "%d answers have zero claims (%s: score 0); see zero_claim_answers in the manifest",
            len(stats["zero_claim_answers"]),
            "left out" if drop_zero_claims else "kept",
        )
    return pairs, stats


def write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build (chosen, rejected) pairs from autocheck scores.")
    p.add_argument("--checked", required=True, help="autocheck stage output")
    p.add_argument("--out", required=True)
    p.add_argument("--max-pairs", type=int, default=2, help="pairs kept per prompt (paper: 2)")
    p.add_argument("--min-diff", type=float, default=1, help="minimum score difference of a pair")
    p.add_argument("--seed", type=int, default=0, help="run seed for sampling pairs")
    p.add_argument("--drop-zero-claims", action="store_true", help="leave answers with no claims out of pairs")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    setup_logging()
    if not is_main():
        return  # whole-file stage: rank 0 does it
    started = time.time()
    errors: list[dict[str, Any]] = []
    pairs, stats = build_pairs(
        load_records(args.checked, "checked"),
        max_pairs=args.max_pairs,
        min_diff=args.min_diff,
        seed=args.seed,
        drop_zero_claims=args.drop_zero_claims,
        errors=errors,
    )
    write_jsonl(args.out, pairs)
    write_jsonl(str(errors_path(args.out)), errors)
    settings = {k: getattr(args, k) for k in ("max_pairs", "min_diff", "seed", "drop_zero_claims")}
    counts = finish_stage(
        args.out,
        stage="pairs",
        config=vars(args),
        counts=stats,
        started=started,
        inputs={"checked": args.checked},
        fingerprint=whole_file_fingerprint(
            "pairs", inputs={"checked": args.checked}, settings=settings, code=code_digest(build_pairs)
        ),
    )
    print(
        f"pairs: {counts['pairs']} pairs from {counts['prompts']} prompts "
        f"({counts['prompts_without_pairs']} without a pair, {len(counts['zero_claim_answers'])} zero-claim answers)"
    )


if __name__ == "__main__":
    main()
