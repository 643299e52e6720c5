"""MMHal-Bench: a text-only judge rates each answer 0-6 from the image contents, question and standard answer.

    python -m eval.mmhal --answers outputs/mmhal/answers.jsonl \\
        --template ../shared/reference/data/rlaifv-original/eval/mmhal-bench_answer_template.json \\
        --judge openai --judge-model gpt-4-0314 \\
        --prompt-file ../shared/reference/prompts/mmhal_judge.txt --out-dir outputs/mmhal

Score = mean rating; hallucination rate = share of ratings below 3; both per question type too. Answers:
JSONL of ``{"id", "answer"}`` with ``id`` the item's index in the template (what ``eval.answer`` writes), or the
template itself with ``model_answer`` filled in (the published workflow).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.judges import Judge, JudgeRequest, add_judge_args, build_judge
from eval.parsers import fill_template, parse_rating
from eval.prompts import MMHAL_JUDGE, load_prompt
from eval.scoring import (
    SampleStore,
    ask_and_parse,
    chunks,
    failure_fields,
    fmt,
    group_mean,
    load_records,
    write_results,
)

logger = logging.getLogger(__name__)

JUDGE_MAX_TOKENS = 1024
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
    """One user message, temperature 0, as the published script."""
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
) -> list[dict[str, Any]]:
    """Rate every item not yet in ``store``; returns all records in item order."""
    for part in chunks(store.todo(items), chunk_size):
        ok = [it for it in part if "error" not in it]
        rated = ask_and_parse(
            judge,
            [judge_request(it, template, max_tokens) for it in ok],
            parse_rating,
            reasks=reasks,
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
                store.write({**base, "rating": rating, "judge_output": resp.text, "attempts": attempts})
    return store.ordered([it["id"] for it in items])


def summarize(records: Sequence[dict[str, Any]], *, unparsed: str = "exclude") -> dict[str, Any]:
    """Mean rating and hallucination rate, overall and per question type.

    Args:
        records: per-item records with ``rating`` (int or None) and ``question_type``.
        unparsed: ``"exclude"`` leaves unrated items out (they are counted in ``n_unrated``); ``"zero"`` rates
            items whose judge output was unparseable 0, as the published script does. Items without an answer
            or with a failed judge call are always left out.
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
        "score": sum(v for _, v in rated) / n if n else None,
        "hallucination_rate": sum(v < HALLUCINATION_BELOW for _, v in rated) / n if n else None,
        "score_by_type": group_mean(rated),
        "hallucination_rate_by_type": group_mean((t, float(v < HALLUCINATION_BELOW)) for t, v in rated),
        "n_items": len(records),
        "n_rated": n,
        "n_unrated": len(records) - n,
        "unparsed_policy": unparsed,
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MMHal-Bench: judge-rated informativeness and hallucination (0-6).")
    p.add_argument("--answers", required=True, help="answers JSONL ({id, answer}) or the filled-in template")
    p.add_argument("--template", required=True, help="mmhal-bench_answer_template.json (the 96 items)")
    p.add_argument("--prompt-file", default=None, help="judge prompt: four {} slots or named slots (default: ours)")
    p.add_argument("--reasks", type=int, default=2, help="re-asks of the judge after an unparseable rating")
    p.add_argument(
        "--unparsed",
        choices=["exclude", "zero"],
        default="exclude",
        help="unparseable ratings: leave out (default) or count as 0 like the published script",
    )
    p.add_argument("--out-dir", required=True, help="writes samples.jsonl and results.json here")
    add_judge_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    args = make_parser().parse_args(argv)
    started = time.time()
    template, source = load_prompt(args.prompt_file, MMHAL_JUDGE)
    items = attach_answers(load_mmhal_items(args.template), load_records(args.answers))
    judge = build_judge(args, Path(args.out_dir) / "judge_cache.sqlite")
    store = SampleStore(Path(args.out_dir) / "samples.jsonl")
    records = score_mmhal(
        items,
        judge,
        store,
        template=template,
        reasks=args.reasks,
        max_tokens=args.judge_max_tokens or JUDGE_MAX_TOKENS,
    )
    store.close()
    metrics = summarize(records, unparsed=args.unparsed)
    config = {"answers": str(args.answers), "template": str(args.template), "prompt": source, "reasks": args.reasks}
    write_results(args.out_dir, benchmark="mmhal", metrics=metrics, config=config, judge=judge, started=started)
    print(
        f"MMHal-Bench ({metrics['n_rated']}/{metrics['n_items']} rated, prompt: {source}): "
        f"score {fmt(metrics['score'], 1, 2)}  hallucination rate {fmt(metrics['hallucination_rate'])}%"
    )
    for t, v in metrics["score_by_type"].items():
        print(f"  {t:<12} {v:.2f}")
    print(f"  -> {Path(args.out_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
