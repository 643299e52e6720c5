"""MMHal-Bench: a text-only judge rates each answer 0-6 from the image contents, question and standard answer.

    python -m eval.mmhal --answers outputs/mmhal/answers.jsonl --template mmhal-bench_answer_template.json \\
        --prompt-file mmhal_judge.txt --judge openai --judge-model gpt-4-0314 --out-dir outputs/mmhal

The template and prompt are the published files (``python -m utils.fetch mmhal-template`` / ``prompt-mmhal-judge``).
``--protocol paper`` (default) reads ratings as the published script (``parsers.parse_rating_paper``: one distinct
``rating: k`` or 0, no re-ask) and prints its rows: average score, hallucination rate, informativeness, per-type
scores by item index mod 8. ``--protocol ours`` re-asks, reads the last rating and leaves unparsed items out
(``lenient_*`` metrics). Answers: JSONL of ``{"id", "answer"}`` (id = item index) or the filled-in template.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.judges import Judge, JudgeRequest, add_judge_args, build_judge
from eval.parsers import parse_rating, parse_rating_paper, rating_found_paper
from eval.prompts import MMHAL_JUDGE
from eval.scoring import (
    SampleStore,
    add_rerun_args,
    ask_and_parse,
    chunks,
    failure_fields,
    fmt,
    group_mean,
    guard_out_dir,
    load_records,
    write_results,
)
from utils.chat_lm.prompts import fill_template, load_prompt
from utils.fetch import file_or_name

logger = logging.getLogger(__name__)

JUDGE_MAX_TOKENS = 1024
PAPER_MAX_TOKENS = 512  # the published Chat default
PROTOCOLS = ("paper", "ours")
HALLUCINATION_BELOW = 3  # ratings 0-2 are "with hallucination" in the judge's scale
SLOTS = ["image_contents", "question", "standard_answer", "response"]  # order of the published prompt's {} slots


def load_mmhal_items(template_path: str | Path) -> list[dict[str, Any]]:
    """The benchmark items (96 in the published file), each with ``id`` = its index in the file."""
    items = load_records(template_path, what="--template")
    need = ("question_type", "image_content", "question", "gt_answer")
    for i, it in enumerate(items):
        missing = [k for k in need if k not in it]
        if missing:
            raise ValueError(
                f"--template '{template_path}' item {i} lacks {missing}; pass "
                "mmhal-bench_answer_template.json or a file with the same fields"
            )
    return [{**it, "id": i} for i, it in enumerate(items)]


def attach_answers(items: list[dict[str, Any]], answers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each item with the model's ``answer``, or ``error`` when the answers file has none for it."""
    by_id: dict[Any, str] = {}
    if answers and all("model_answer" in a and "id" not in a for a in answers):  # a filled-in template
        if len(answers) != len(items):
            raise ValueError(
                f"the answers file is a filled-in template of {len(answers)} items but the benchmark "
                f"has {len(items)}; fill in the full template"
            )
        by_id = {i: a["model_answer"] for i, a in enumerate(answers)}
    else:
        for n, a in enumerate(answers):
            key, text = a.get("id", a.get("question_id")), a.get("answer", a.get("text"))
            if not isinstance(key, int | str) or not str(key).isdigit() or not isinstance(text, str):
                logger.warning(
                    "answers record %d has no integer 'id' (the item's index) or no string 'answer'; it is ignored", n
                )
                continue
            by_id[int(key)] = text
    out = []
    for it in items:
        text = by_id.get(it["id"])
        if not isinstance(text, str) or not text.strip():
            out.append({**it, "answer": text, "error": f"no answer for item {it['id']} in the answers file"})
        else:
            out.append({**it, "answer": text})
    missing = sum("error" in r for r in out)
    if missing:
        logger.warning(
            "%d of %d items have no answer in the answers file; they are recorded as unanswered", missing, len(out)
        )
    return out


def judge_request(item: dict[str, Any], template: str, max_tokens: int = JUDGE_MAX_TOKENS) -> JudgeRequest:
    """One user message (no system message), temperature 0, as the published script."""
    values = {
        "image_contents": ", ".join(item["image_content"]),
        "question": item["question"],
        "standard_answer": item["gt_answer"],
        "response": item["answer"],
    }
    text = fill_template(template, values, SLOTS, where="MMHal judge prompt")
    return JudgeRequest.chat(user=text, temperature=0.0, max_tokens=max_tokens)


def score_mmhal(
    items: Sequence[dict[str, Any]],
    judge: Judge,
    store: SampleStore,
    *,
    template: str = MMHAL_JUDGE,
    reasks: int = 2,
    chunk_size: int = 32,
    max_tokens: int = JUDGE_MAX_TOKENS,
    progress: bool = True,
    protocol: str = "paper",
) -> list[dict[str, Any]]:
    """Rate every item not yet in ``store``; returns all records in item order.

    ``protocol="paper"`` reads each reply with ``parse_rating_paper`` (never unparseable, so never re-asked;
    ``rating_found`` says whether the 0 is a rating or the published fallback).
    """
    paper = protocol == "paper"
    for part in chunks(store.todo(items), chunk_size):
        ok = [it for it in part if "error" not in it]
        rated = ask_and_parse(
            judge,
            [judge_request(it, template, max_tokens) for it in ok],
            parse_rating_paper if paper else parse_rating,
            reasks=0 if paper else reasks,
            progress=progress,
        )
        by_id = dict(zip([it["id"] for it in ok], rated))
        for it in part:
            base = {
                "id": it["id"],
                "question_type": it["question_type"],
                "question": it["question"],
                "answer": it.get("answer"),
            }
            if "error" in it:
                store.write({**base, "rating": None, "error": it["error"]})
                continue
            rating, resp, attempts = by_id[it["id"]]
            if rating is None:
                store.write({**base, "rating": None, **failure_fields(resp, attempts, "rating")})
            else:
                found = {"rating_found": rating_found_paper(resp.text)} if paper else {}
                store.write({**base, "rating": rating, **found, "judge_output": resp.text, "attempts": attempts})
    return store.ordered([it["id"] for it in items])


def summarize(records: Sequence[dict[str, Any]], *, unparsed: str = "exclude") -> dict[str, Any]:
    """Our lenient summary (``--protocol ours``): mean rating and hallucination rate, overall and per type.

    Args:
        records: per-item records with ``rating`` (int or None) and ``question_type``.
        unparsed: ``"exclude"`` leaves unrated items out (they are counted in ``n_unrated``); ``"zero"`` rates
            items whose judge output was unparseable 0. Items without an answer or with a failed judge call are
            always left out. The metric names carry ``lenient_``: they are not the paper's numbers.
    """
    if unparsed not in ("exclude", "zero"):
        raise ValueError(f"unparsed must be 'exclude' or 'zero', got {unparsed!r}")
    rated = []
    for r in records:
        rating = r.get("rating")
        if rating is None and unparsed == "zero" and str(r.get("error", "")).startswith("unparseable"):
            rating = 0
        if rating is not None:
            rated.append((r["question_type"], int(rating)))
    n = len(rated)
    return {
        "lenient_score": sum(v for _, v in rated) / n if n else None,
        "lenient_hallucination_rate": sum(v < HALLUCINATION_BELOW for _, v in rated) / n if n else None,
        "lenient_score_by_type": group_mean(rated),
        "lenient_hallucination_rate_by_type": group_mean((t, float(v < HALLUCINATION_BELOW)) for t, v in rated),
        "n_items": len(records),
        "n_rated": n,
        "n_unrated": len(records) - n,
        "unparsed_policy": unparsed,
    }


def summarize_paper(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The published summary (``eval_gpt_mmhal.py`` / ``summarize_gpt_mmhal_review.py``) of ``--protocol paper``
    records.

    ``average_score`` = mean rating; ``hallucination_rate`` = share of ratings below 3 (a fraction, as printed
    there); ``informativeness`` = mean of (k - 3 if k >= 3 else k) / 3 x 100; ``average_score_by_type`` groups
    items by index mod 8 (the published template cycles through the 8 types), in that order. Items without an
    answer or judge reply are left out and counted in ``n_unscored`` (the published script has none).
    """
    scored = [(int(r["id"]), r["question_type"], int(r["rating"])) for r in records if r.get("rating") is not None]
    n = len(scored)
    groups: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for i, t, k in sorted(scored):
        groups.setdefault(i % 8, []).append(k)
        names.setdefault(i % 8, t)
    return {
        "average_score": sum(k for *_, k in scored) / n if n else None,
        "hallucination_rate": sum(k < HALLUCINATION_BELOW for *_, k in scored) / n if n else None,
        "informativeness": 100 * sum(k - 3 if k >= 3 else k for *_, k in scored) / n / 3 if n else None,
        "average_score_by_type": {names[g]: sum(v) / len(v) for g, v in sorted(groups.items())},
        "n_items": len(records),
        "n_scored": n,
        "n_rating_not_found": sum(
            1 for r in records if r.get("rating") is not None and not r.get("rating_found", True)
        ),
        "n_unscored": len(records) - n,
    }


def format_paper_summary(m: dict[str, Any]) -> str:
    """The published printout: informativeness, average score, hallucination rate, per-type scores."""

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    by_type = ",".join(str(round(v, 2)) for v in m["average_score_by_type"].values())
    return (
        f"Informativeness: {f(m['informativeness'])}\n"
        f"Average score: {f(m['average_score'])}\n"
        f"Hallucination rate: {f(m['hallucination_rate'])}\n"
        f"Average score for each question type: {by_type}\n"
        f"  (types: {','.join(m['average_score_by_type'])})"
    )


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MMHal-Bench: judge-rated informativeness and hallucination (0-6).")
    p.add_argument("--answers", required=True, help="answers JSONL ({id, answer}) or the filled-in template")
    p.add_argument(
        "--template",
        type=file_or_name,
        required=True,
        help="the published mmhal-bench_answer_template.json, 96 items (python -m utils.fetch mmhal-template)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="paper",
        help="paper: the published rating rule, no re-asks, its printed rows (comparable with the paper); "
        "ours: lenient rating parser with re-asks, metrics named lenient_*",
    )
    p.add_argument(
        "--prompt-file",
        type=file_or_name,
        default=None,
        help="judge prompt (four {} slots or named slots); paper: the published prompt "
        "(python -m utils.fetch prompt-mmhal-judge); ours: default our prompt",
    )
    p.add_argument("--reasks", type=int, default=2, help="ours: re-asks of the judge after an unparseable rating")
    p.add_argument(
        "--unparsed",
        choices=["exclude", "zero"],
        default="exclude",
        help="ours: unparseable ratings are left out (default) or count as 0",
    )
    p.add_argument("--out-dir", required=True, help="writes samples.jsonl and results.json here")
    add_judge_args(p)
    add_rerun_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    args = make_parser().parse_args(argv)
    paper = args.protocol == "paper"
    if paper and args.prompt_file is None:
        raise SystemExit(
            "--protocol paper needs the published judge prompt: fetch it with "
            "`python -m utils.fetch prompt-mmhal-judge` and pass --prompt-file (or use --protocol ours)"
        )
    started = time.time()
    template, source = load_prompt(args.prompt_file, MMHAL_JUDGE)
    items = attach_answers(load_mmhal_items(args.template), load_records(args.answers))
    judge = build_judge(args, Path(args.out_dir) / "judge_cache.sqlite")
    guard_out_dir(args, judge, benchmark="mmhal")  # refuses samples made from other inputs (docs/RESUMING.md)
    store = SampleStore(Path(args.out_dir) / "samples.jsonl")
    max_tokens = args.judge_max_tokens or (PAPER_MAX_TOKENS if paper else JUDGE_MAX_TOKENS)
    records = score_mmhal(
        items, judge, store, template=template, reasks=args.reasks, max_tokens=max_tokens, protocol=args.protocol
    )
    store.close()
    metrics = summarize_paper(records) if paper else summarize(records, unparsed=args.unparsed)
    config = {
        "protocol": args.protocol,
        "answers": str(args.answers),
        "template": str(args.template),
        "prompt": source,
        "reasks": 0 if paper else args.reasks,
        "unparsed": "zero (published rule)" if paper else args.unparsed,
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }
    write_results(args.out_dir, benchmark="mmhal", metrics=metrics, config=config, judge=judge, started=started)
    if paper:
        print(f"MMHal-Bench, protocol paper ({metrics['n_scored']}/{metrics['n_items']} scored, prompt: {source}):")
        print(format_paper_summary(metrics))
    else:
        print(
            f"MMHal-Bench, protocol ours ({metrics['n_rated']}/{metrics['n_items']} rated, prompt: {source}): "
            f"lenient score {fmt(metrics['lenient_score'], 1, 2)}  "
            f"lenient hallucination rate {fmt(metrics['lenient_hallucination_rate'])}%"
        )
        for t, v in metrics["lenient_score_by_type"].items():
            print(f"  {t:<12} {v:.2f}")
    print(f"  -> {Path(args.out_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
