"""Stage 6, balance: remove the length bias between chosen and rejected answers.

    python -m muffin.feedback.balance --pairs work/pairs.jsonl --out work/balanced.jsonl

Answers with fewer claims have fewer chances to be wrong, so chosen answers tend to be shorter; DPO would learn
"be brief". First pairs whose two answers are identical are dropped; then a threshold r is searched over
0, 0.02, ..., 0.98: drop pairs with (len_rej - len_chosen) / len_rej > r, and keep the r that minimises
|mean len chosen - mean len rejected| / mean len rejected (ties: the larger r, which keeps more pairs).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from muffin.feedback.pairs import write_jsonl
from muffin.feedback.stage import finish_stage, load_records, whole_file_fingerprint
from utils.dist import is_main, setup_logging
from utils.fingerprint import code_digest

logger = logging.getLogger(__name__)

GRID = tuple(round(0.02 * i, 2) for i in range(50))  # 0, 0.02, ..., 0.98


def text_length(text: str, unit: str = "words") -> int:
    """Length of an answer in whitespace-separated words (``unit="words"``) or characters (``"chars"``)."""
    if unit == "words":
        return len(text.split())
    if unit == "chars":
        return len(text)
    raise ValueError(f"unknown length unit '{unit}'. Available: words, chars.")


def shortening(len_chosen: int, len_rejected: int) -> float:
    """(len_rej - len_chosen) / len_rej: how much shorter the chosen answer is (negative when longer)."""
    return (len_rejected - len_chosen) / len_rejected if len_rejected > 0 else 0.0


def length_gap(len_chosen: Sequence[int], len_rejected: Sequence[int]) -> float:
    """|mean len chosen - mean len rejected| / mean len rejected (inf for an empty set)."""
    if not len_chosen:
        return float("inf")
    mc, mr = sum(len_chosen) / len(len_chosen), sum(len_rejected) / len(len_rejected)
    return abs(mc - mr) / mr if mr > 0 else float("inf")


@dataclass
class BalanceResult:
    """The chosen threshold, which pairs it keeps, and the whole search table ``(r, kept, gap)``."""

    r: float | None
    keep: list[bool]
    gap: float
    table: list[tuple[float, int, float]] = field(default_factory=list)


def balance_search(
    len_chosen: Sequence[int], len_rejected: Sequence[int], grid: Sequence[float] = GRID
) -> BalanceResult:
    """Search the threshold r that best equalises the mean lengths (see the module docstring).

    Example:
        >>> balance_search([10, 2, 10], [10, 10, 8], grid=[0.0, 0.5, 0.9]).r
        0.5
    """
    shrink = [shortening(c, r) for c, r in zip(len_chosen, len_rejected)]
    best = BalanceResult(None, [False] * len(shrink), float("inf"))
    for r in grid:
        keep = [s <= r for s in shrink]
        kc = [c for c, k in zip(len_chosen, keep) if k]
        kr = [x for x, k in zip(len_rejected, keep) if k]
        gap = length_gap(kc, kr)
        best.table.append((r, len(kc), gap))
        if gap <= best.gap and kc:
            best.r, best.keep, best.gap = r, keep, gap
    return best


def balance_pairs(
    pairs: Sequence[dict[str, Any]], *, unit: str = "words", grid: Sequence[float] = GRID
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Drop identical pairs, then the too-short-chosen pairs; returns (kept pairs in order, statistics)."""
    distinct = [p for p in pairs if p["chosen"].strip() != p["rejected"].strip()]
    lc = [text_length(p["chosen"], unit) for p in distinct]
    lr = [text_length(p["rejected"], unit) for p in distinct]
    res = balance_search(lc, lr, grid)
    kept = [p for p, k in zip(distinct, res.keep) if k]
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    stats = {
        "pairs_in": len(pairs),
        "identical_dropped": len(pairs) - len(distinct),
        "r": res.r,
        "dropped_short_chosen": len(distinct) - len(kept),
        "pairs_out": len(kept),
        "unit": unit,
        "mean_len_chosen_before": mean(lc),
        "mean_len_rejected_before": mean(lr),
        "gap_before": round(length_gap(lc, lr), 4) if lc else None,
        "mean_len_chosen_after": mean([x for x, k in zip(lc, res.keep) if k]),
        "mean_len_rejected_after": mean([x for x, k in zip(lr, res.keep) if k]),
        "gap_after": round(res.gap, 4) if kept else None,
        "search": [{"r": r, "kept": n, "gap": round(g, 4) if g != float("inf") else None} for r, n, g in res.table],
    }
    return kept, stats


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Drop identical and too-short-chosen pairs to balance lengths.")
    p.add_argument("--pairs", required=True, help="pairs stage output")
    p.add_argument("--out", required=True)
    p.add_argument("--unit", default="words", choices=["words", "chars"], help="how answer length is counted")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    setup_logging()
    if not is_main():
        return  # whole-file stage: rank 0 does it
    started = time.time()
    kept, stats = balance_pairs(load_records(args.pairs, "pairs"), unit=args.unit)
    write_jsonl(args.out, kept)
    finish_stage(
        args.out,
        stage="balance",
        config=vars(args),
        counts=stats,
        started=started,
        inputs={"pairs": args.pairs},
        fingerprint=whole_file_fingerprint(
            "balance", inputs={"pairs": args.pairs}, settings={"unit": args.unit}, code=code_digest(balance_pairs)
        ),
    )
    print(
        f"balance: r={stats['r']}, kept {stats['pairs_out']}/{stats['pairs_in']} pairs "
        f"(identical {stats['identical_dropped']}), length gap {stats['gap_before']} -> {stats['gap_after']}"
    )


if __name__ == "__main__":
    main()
