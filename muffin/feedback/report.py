"""The feedback data report: the statistics users look at, as JSON and Markdown, plus PNG histograms.

    python -m muffin.feedback.report --checked work/checked.jsonl --pairs work/pairs.jsonl \
        --balanced work/balanced.jsonl --out-dir work/report

Claims per answer, share of claims judged false, per-prompt score spread, pairs per prompt, length of chosen vs
rejected answers (before and after balancing) and error counts per stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muffin.feedback.autocheck import group_by_prompt
from muffin.feedback.stage import load_records, read_errors
from utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def _describe(xs: Sequence[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "mean": round(statistics.fmean(xs), 4),
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
    }


def _lengths(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    lc = [len(p["chosen"].split()) for p in pairs]
    lr = [len(p["rejected"].split()) for p in pairs]
    return {"chosen_words": _describe(lc), "rejected_words": _describe(lr)}


def compute_stats(
    checked: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    balanced: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """All report numbers from the autocheck output and the pairs (and balanced pairs, when given)."""
    ok = [r for r in checked if not r.get("error")]
    failed = Counter((r.get("error") or {}).get("stage") for r in checked if r.get("error"))
    claimed = [r for r in ok if "verdicts" in r]  # reward-ranked feedback has no claims
    n_claims = [len(r["verdicts"]) for r in claimed]
    share = [r["n_false"] / len(r["verdicts"]) for r in claimed if r["verdicts"]]
    spread = []
    for group in group_by_prompt(ok):
        scores = [r["score"] for r in group]
        spread.append(max(scores) - min(scores))
    per_prompt = Counter(p["prompt_id"] for p in pairs)
    prompts = {r["prompt_id"] for r in checked}
    pairs_per_prompt = Counter(per_prompt.get(pid, 0) for pid in prompts)
    total_claims = sum(n_claims)
    stats: dict[str, Any] = {
        "prompts": len(prompts),
        "answers": len(checked),
        "answers_checked": len(ok),
        "answers_failed_by_stage": dict(failed),
        "zero_claim_answers": sum(1 for n in n_claims if n == 0),
        "claims_per_answer": _describe(n_claims),
        "claims_total": total_claims,
        "share_claims_false": round(sum(r["n_false"] for r in claimed) / total_claims, 4) if total_claims else None,
        "share_false_per_answer": _describe(share),
        "score": _describe([r["score"] for r in ok]),
        "score_spread_per_prompt": _describe(spread),
        "pairs": len(pairs),
        "pairs_per_prompt": {str(k): v for k, v in sorted(pairs_per_prompt.items())},
        "length_pairs": _lengths(pairs),
    }
    if any("reward_mean" in r for r in ok):
        stats["reward_mean"] = _describe([r["reward_mean"] for r in ok if "reward_mean" in r])
        stats["reward_sum"] = _describe([r["reward_sum"] for r in ok if "reward_sum" in r])
    if balanced is not None:
        stats["pairs_balanced"] = len(balanced)
        stats["length_balanced"] = _lengths(balanced)
    stats["_series"] = {
        "claims_per_answer": n_claims,
        "share_false": share,
        "score_spread": spread,
        "pairs_per_prompt": [per_prompt.get(pid, 0) for pid in sorted(prompts)],
        "len_chosen": [len(p["chosen"].split()) for p in (balanced if balanced is not None else pairs)],
        "len_rejected": [len(p["rejected"].split()) for p in (balanced if balanced is not None else pairs)],
    }
    return stats


def plot_histograms(series: dict[str, list[float]], out_dir: str | Path) -> list[Path]:
    """One PNG per statistic (matplotlib Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        ("claims_per_answer", "claims per answer", "answers"),
        ("share_false", "share of claims judged false", "answers"),
        ("score_spread", "max - min score per prompt", "prompts"),
        ("pairs_per_prompt", "pairs per prompt", "prompts"),
    ]
    paths = []
    for key, xlabel, ylabel in plots:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(series[key] or [0], bins=20)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        fig.tight_layout()
        paths.append(out_dir / f"{key}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist([series["len_chosen"] or [0], series["len_rejected"] or [0]], bins=20, label=["chosen", "rejected"])
    ax.set(xlabel="answer length (words)", ylabel="pairs")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "lengths.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def to_markdown(stats: dict[str, Any]) -> str:
    lines = ["# Feedback data report", "", "| statistic | value |", "|---|---|"]
    for k, v in stats.items():
        if not k.startswith("_"):
            lines.append(f"| {k} | {json.dumps(v) if isinstance(v, dict | list) else v} |")
    return "\n".join(lines) + "\n"


def write_report(
    checked: Sequence[dict[str, Any]],
    pairs: Sequence[dict[str, Any]],
    balanced: Sequence[dict[str, Any]] | None,
    out_dir: str | Path,
    errors: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the histograms into ``out_dir``; returns the statistics."""
    stats = compute_stats(checked, pairs, balanced)
    series = stats.pop("_series")
    if errors is not None:
        stats["errors_per_stage"] = errors
    plot_histograms(series, out_dir)
    atomic_write_json(Path(out_dir) / "report.json", stats)
    atomic_write_text(Path(out_dir) / "report.md", to_markdown(stats))
    return stats


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Statistics and histograms of a feedback data run.")
    p.add_argument("--checked", required=True, help="autocheck stage output")
    p.add_argument("--pairs", required=True, help="pairs stage output")
    p.add_argument("--balanced", default=None, help="balance stage output")
    p.add_argument("--out-dir", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    errors = {Path(f).stem: len(read_errors(f)) for f in (args.checked, args.pairs)}
    stats = write_report(
        load_records(args.checked, "checked"),
        load_records(args.pairs, "pairs"),
        load_records(args.balanced, "balanced") if args.balanced else None,
        args.out_dir,
        errors,
    )
    print(to_markdown(stats))


if __name__ == "__main__":
    main()
