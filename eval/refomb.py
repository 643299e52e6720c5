"""RefoMB: pairwise judging against GPT-4V reference answers, given a hidden detailed image description.

    python -m eval.refomb overall --answers outputs/refomb/answers.jsonl --reference gpt4v_RefoMB_dev_0521.jsonl \\
        --prompt-file refomb_pairwise.txt --judge openai --judge-model gpt-4-1106-preview --out-dir outputs/refomb/o
    python -m eval.refomb hall --reviews outputs/refomb/o/samples.jsonl --prompt-file refomb_hallucination.txt \\
        --judge openai --judge-model gpt-4-1106-preview --out-dir outputs/refomb/hall

Published files: ``python -m utils.fetch refomb-gpt4v`` / ``prompt-refomb-pairwise`` / ``prompt-refomb-hallucination``.
Pass ``overall``: model A = the reference answer, model B = the evaluated model; item score -1 / +1 / 0 for
``[[A]]`` / ``[[B]]`` / ``[[C]]``, score = mean((s+1)/2). Pass ``hall`` asks which answer of each review
hallucinates less. ``--protocol paper`` (default) is the published scripts' layout (generic system message,
instructions in the user message), parser (the first verdict; asked again when none) and the json_to_excel
win/loss/tie table per category; ``--protocol ours`` takes the last verdict leniently (``lenient_*`` metrics).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.judges import Judge, JudgeRequest, add_judge_args, build_judge
from eval.parsers import choice_score, parse_choice, parse_choice_paper
from eval.prompts import (
    REFOMB_HALLUCINATION_SYSTEM,
    REFOMB_PAIRWISE_SYSTEM,
    REFOMB_PAPER_HALLUCINATION_SYSTEM,
    REFOMB_PAPER_PAIRWISE_SYSTEM,
    refomb_hallucination_query_paper,
    refomb_hallucination_user,
    refomb_pairwise_query_paper,
    refomb_pairwise_user,
)
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
from utils.chat_lm.prompts import load_prompt
from utils.fetch import file_or_name

logger = logging.getLogger(__name__)

JUDGE_MAX_TOKENS = 2048
PROTOCOLS = ("paper", "ours")
PAPER_REASKS = 99  # the published scripts ask again until a verdict parses; this bounds it
PAPER_TEMPERATURE = {"overall": 1e-5, "hall": 0.0}  # eval_RefoMB_p0.py / eval_hallucination.py
# json_to_excel.py's categories, in its column order
CATEGORIES = (
    "Coarse Perception",
    "Fine-grained perception",
    "Relation reasoning",
    "Attribute reasoning",
    "Time series inference",
    "Mechanical logical reasoning",
    "Creative generation",
    "OCR",
)
RUN_STRIDE = 1000  # JudgeRequest.attempt = RUN_STRIDE * run + re-ask: every run is its own judge call


def load_refomb_items(path: str | Path) -> list[dict[str, Any]]:
    """Items of the reference file (``gpt4v_RefoMB_dev_0521.jsonl``): id, question, description, type, reference."""
    items = []
    for n, rec in enumerate(load_records(path, what="--reference")):
        missing = [k for k in ("id", "question", "description", "type", "answer") if k not in rec]
        if missing:
            raise ValueError(
                f"--reference '{path}' record {n} lacks {missing}; pass gpt4v_RefoMB_dev_0521.jsonl "
                "(the items with GPT-4V's reference answers)"
            )
        items.append({**rec, "reference": rec["answer"]})
    return items


def attach_answers(items: list[dict[str, Any]], answers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each item with the model's ``model_answer`` (matched by ``id``, else by image URL and question)."""
    by_id, by_pair = {}, {}
    for a in answers:
        text = a.get("answer", a.get("text"))
        if not isinstance(text, str):
            continue
        if a.get("id") is not None:
            by_id[a["id"]] = text
        if a.get("image_url") is not None:
            by_pair[(a["image_url"], a.get("question", a.get("prompt")))] = text
    out = []
    for it in items:
        text = by_id.get(it["id"], by_pair.get((it.get("image_url"), it["question"])))
        if text is None or not text.strip():
            out.append({**it, "model_answer": text, "error": f"no answer for item {it['id']} in the answers file"})
        else:
            out.append({**it, "model_answer": text})
    missing = sum("error" in r for r in out)
    if missing:
        logger.warning(
            "%d of %d items have no answer in the answers file; they are recorded as unanswered", missing, len(out)
        )
    return out


def _base(it: dict[str, Any], run: int) -> dict[str, Any]:
    return {"id": f"{it['id']}#{run}", "item_id": it["id"], "run": run, "type": it["type"]}


def score_overall(
    items: Sequence[dict[str, Any]],
    judge: Judge,
    store: SampleStore,
    *,
    runs: int = 1,
    system: str = REFOMB_PAIRWISE_SYSTEM,
    reasks: int = 2,
    chunk_size: int = 32,
    max_tokens: int = JUDGE_MAX_TOKENS,
    protocol: str = "paper",
) -> list[dict[str, Any]]:
    """Pairwise verdicts of every (item, run) not yet in ``store``; returns all records in (run, item) order.

    ``system`` is the instruction text: with ``protocol="paper"`` it goes into the user message under the
    published generic system message, at temperature 1e-5, and the first verdict counts; with ``"ours"`` it is
    the system message and ``parse_choice`` reads the last verdict.
    """
    jobs = [(it, r) for r in range(runs) for it in items]
    for part in chunks(store.todo(jobs, key=lambda j: _base(*j)["id"]), chunk_size):
        ok = [(it, r) for it, r in part if "error" not in it]
        reqs = [_pairwise_request(it, system, protocol, max_tokens, RUN_STRIDE * r) for it, r in ok]
        parse = parse_choice_paper if protocol == "paper" else parse_choice
        verdicts = dict(
            zip([_base(*j)["id"] for j in ok], ask_and_parse(judge, reqs, parse, reasks=reasks, progress=True))
        )
        for it, r in part:
            base = _base(it, r)
            if "error" in it:
                store.write({**base, "choice": None, "score": None, "error": it["error"]})
                continue
            choice, resp, attempts = verdicts[base["id"]]
            if choice is None:
                store.write({**base, "choice": None, "score": None, **failure_fields(resp, attempts, "verdict")})
            else:
                store.write({**base, "choice": choice, "score": choice_score(choice), "review": resp.text})
    return store.ordered([_base(it, r)["id"] for it, r in jobs])


def _pairwise_request(it: dict[str, Any], system: str, protocol: str, max_tokens: int, attempt: int) -> JudgeRequest:
    if protocol == "paper":
        answer_b = it["model_answer"].replace("<|endoftext|>", "<EOT>")  # as the published reader does
        user = refomb_pairwise_query_paper(system, it["description"], it["question"], it["reference"], answer_b)
        return JudgeRequest.chat(
            system=REFOMB_PAPER_PAIRWISE_SYSTEM,
            user=user,
            temperature=PAPER_TEMPERATURE["overall"],
            max_tokens=max_tokens,
            attempt=attempt,
        )
    user = refomb_pairwise_user(it["description"], it["question"], it["reference"], it["model_answer"])
    return JudgeRequest.chat(system=system, user=user, temperature=0.0, max_tokens=max_tokens, attempt=attempt)


def _hallucination_request(review: str, system: str, protocol: str, max_tokens: int, attempt: int) -> JudgeRequest:
    if protocol == "paper":
        return JudgeRequest.chat(
            system=REFOMB_PAPER_HALLUCINATION_SYSTEM,
            user=refomb_hallucination_query_paper(system, review),
            temperature=PAPER_TEMPERATURE["hall"],
            max_tokens=max_tokens,
            attempt=attempt,
        )
    return JudgeRequest.chat(
        system=system, user=refomb_hallucination_user(review), temperature=0.0, max_tokens=max_tokens, attempt=attempt
    )


def score_hallucination(
    reviews: Sequence[dict[str, Any]],
    judge: Judge,
    store: SampleStore,
    *,
    system: str = REFOMB_HALLUCINATION_SYSTEM,
    reasks: int = 2,
    chunk_size: int = 32,
    max_tokens: int = JUDGE_MAX_TOKENS,
    protocol: str = "paper",
) -> list[dict[str, Any]]:
    """Second pass over the overall pass's records: which answer has fewer hallucinations, per review."""
    for part in chunks(store.todo(reviews), chunk_size):
        ok = [rv for rv in part if rv.get("review")]
        reqs = [
            _hallucination_request(rv["review"], system, protocol, max_tokens, RUN_STRIDE * int(rv.get("run", 0)))
            for rv in ok
        ]
        parse = parse_choice_paper if protocol == "paper" else parse_choice
        verdicts = dict(zip([rv["id"] for rv in ok], ask_and_parse(judge, reqs, parse, reasks=reasks, progress=True)))
        for rv in part:
            base = {k: rv.get(k) for k in ("id", "item_id", "run", "type")}
            if rv["id"] not in verdicts:
                store.write(
                    {
                        **base,
                        "choice": None,
                        "score": None,
                        "error": f"no review from the overall pass ({rv.get('error', 'missing')})",
                    }
                )
                continue
            choice, resp, attempts = verdicts[rv["id"]]
            if choice is None:
                store.write({**base, "choice": None, "score": None, **failure_fields(resp, attempts, "verdict")})
            else:
                store.write({**base, "choice": choice, "score": choice_score(choice), "review": resp.text})
    return store.ordered([rv["id"] for rv in reviews])


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Our summary (``--protocol ours``): score = mean((s+1)/2) per run, overall and per type; across runs mean,
    sample std, min, max, under ``lenient_*`` names.

    Records without a score (no answer, judge failure, no verdict) are left out and counted in ``n_unscored``;
    a run with nothing scored has score None and is left out of the mean and spread.
    """
    per_run = {}
    for run, recs in _by_run(records).items():
        scored = [(r["type"], (r["score"] + 1) / 2) for r in recs if r.get("score") is not None]
        per_run[run] = {
            "score": sum(v for _, v in scored) / len(scored) if scored else None,
            "score_by_type": group_mean(scored),
            **_counts(recs),
        }
    types = sorted({t for v in per_run.values() for t in v["score_by_type"]})
    by_type = {
        t: statistics.fmean([v["score_by_type"][t] for v in per_run.values() if t in v["score_by_type"]])
        for t in types
    }
    return {
        **{f"lenient_{k}": v for k, v in _spread(per_run).items()},
        "lenient_score_by_type": by_type,
        "runs": per_run,
    }


def summarize_paper(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The published summary per run: ``score`` = mean((s+1)/2) (eval_RefoMB_p0.py's "Score is"), and
    json_to_excel.py's table: win / loss / tie of the evaluated model (B) and "win/loss/tie" per category, in its
    column order (a category it does not list comes after). Across runs: mean, sample std, min, max."""
    per_run = {}
    for run, recs in _by_run(records).items():
        scored = [r for r in recs if r.get("score") is not None]
        cats = {c: [0, 0, 0] for c in CATEGORIES}
        for r in scored:
            cell = cats.setdefault(r["type"], [0, 0, 0])
            cell[0 if r["score"] == 1 else 1 if r["score"] == -1 else 2] += 1
        per_run[run] = {
            "score": sum((r["score"] + 1) / 2 for r in scored) / len(scored) if scored else None,
            "categories": {c: "/".join(map(str, v)) for c, v in cats.items()},
            **_counts(recs),
        }
    return {**_spread(per_run), "runs": per_run}


def _by_run(records: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    runs: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        runs.setdefault(int(r.get("run", 0)), []).append(r)
    return dict(sorted(runs.items()))


def _counts(recs: Sequence[dict[str, Any]]) -> dict[str, int]:
    n = sum(r.get("score") is not None for r in recs)
    return {
        "wins": sum(r.get("choice") == "B" for r in recs),
        "losses": sum(r.get("choice") == "A" for r in recs),
        "ties": sum(r.get("choice") == "C" for r in recs),
        "n_scored": n,
        "n_unscored": len(recs) - n,
    }


def _spread(per_run: dict[int, dict[str, Any]]) -> dict[str, Any]:
    scores = [v["score"] for v in per_run.values() if v["score"] is not None]
    return {
        "score": statistics.fmean(scores) if scores else None,
        "score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0 if scores else None,
        "score_min": min(scores, default=None),
        "score_max": max(scores, default=None),
        "n_runs": len(per_run),
    }


def format_paper_summary(m: dict[str, Any]) -> str:
    """Per run: the published "Score is" line and json_to_excel's row (win, loss, tie, score, categories)."""
    lines = []
    for run, v in m["runs"].items():
        score = "n/a" if v["score"] is None else f"{v['score']:.3f}"
        lines.append(f"run {run}: Score is {score}  win {v['wins']}  loss {v['losses']}  tie {v['ties']}")
        lines += [f"    {c:<30} {wlt}" for c, wlt in v["categories"].items()]
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="RefoMB pairwise evaluation against reference answers.")
    sub = p.add_subparsers(dest="stage", required=True)
    o = sub.add_parser("overall", help="pairwise pass: reference (A) versus the model (B)")
    o.add_argument("--answers", required=True, help="answers JSONL: id (or image_url + question), answer")
    o.add_argument(
        "--reference",
        type=file_or_name,
        required=True,
        help="the published gpt4v_RefoMB_dev_0521.jsonl with GPT-4V's answers (python -m utils.fetch refomb-gpt4v)",
    )
    o.add_argument("--runs", type=int, default=1, help="repeated judge runs, averaged with their spread")
    h = sub.add_parser("hall", help="hallucination pass over the reviews of an overall pass")
    h.add_argument("--reviews", required=True, help="samples.jsonl of the overall pass")
    for sp, name in ((o, "prompt-refomb-pairwise"), (h, "prompt-refomb-hallucination")):
        sp.add_argument(
            "--protocol",
            choices=PROTOCOLS,
            default="paper",
            help="paper: the published message layout, first-verdict parser and re-asks, win/loss/tie table; "
            "ours: instructions as the system message, lenient last-verdict parser (lenient_* metrics)",
        )
        sp.add_argument(
            "--prompt-file",
            type=file_or_name,
            default=None,
            help=f"judge instructions; paper: the published text (python -m utils.fetch {name}); ours: default ours",
        )
        sp.add_argument(
            "--reasks",
            type=int,
            default=None,
            help="re-asks after a reply without a verdict (default: paper 99, the published script asks until "
            "one comes; ours 2)",
        )
        sp.add_argument("--out-dir", required=True, help="writes samples.jsonl and results.json here")
        add_judge_args(sp)
        add_rerun_args(sp)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    args = make_parser().parse_args(argv)
    paper = args.protocol == "paper"
    fetch = "prompt-refomb-pairwise" if args.stage == "overall" else "prompt-refomb-hallucination"
    if paper and args.prompt_file is None:
        raise SystemExit(
            f"--protocol paper needs the published instructions: fetch them with `python -m utils.fetch {fetch}` "
            "and pass --prompt-file (or use --protocol ours)"
        )
    reasks = args.reasks if args.reasks is not None else PAPER_REASKS if paper else 2
    started = time.time()
    judge = build_judge(args, Path(args.out_dir) / "judge_cache.sqlite")
    guard_out_dir(args, judge, benchmark=f"refomb-{args.stage}")  # refuses samples made from other inputs
    store = SampleStore(Path(args.out_dir) / "samples.jsonl")
    max_tokens = args.judge_max_tokens or JUDGE_MAX_TOKENS
    common = {"reasks": reasks, "max_tokens": max_tokens, "protocol": args.protocol}
    if args.stage == "overall":
        system, source = load_prompt(args.prompt_file, REFOMB_PAIRWISE_SYSTEM)
        items = attach_answers(load_refomb_items(args.reference), load_records(args.answers))
        records = score_overall(items, judge, store, runs=args.runs, system=system, **common)
        config = {"answers": str(args.answers), "reference": str(args.reference), "runs": args.runs}
    else:
        system, source = load_prompt(args.prompt_file, REFOMB_HALLUCINATION_SYSTEM)
        reviews = load_records(args.reviews, what="--reviews")
        records = score_hallucination(reviews, judge, store, system=system, **common)
        config = {"reviews": str(args.reviews)}
    store.close()
    metrics = summarize_paper(records) if paper else summarize(records)
    temperature = PAPER_TEMPERATURE[args.stage] if paper else 0.0
    write_results(
        args.out_dir,
        benchmark=f"refomb-{args.stage}",
        metrics=metrics,
        config={**config, **common, "prompt": source, "temperature": temperature},
        judge=judge,
        started=started,
    )
    name = "overall" if args.stage == "overall" else "trustworthiness"
    key = "score" if paper else "lenient_score"
    print(
        f"RefoMB {name}, protocol {args.protocol}: {key} {fmt(metrics[key])} (std {fmt(metrics[key + '_std'])} over "
        f"{metrics[key.replace('score', 'n_runs')]} runs; prompt: {source})"
    )
    if paper:
        print(format_paper_summary(metrics))
    else:
        for t, v in metrics["lenient_score_by_type"].items():
            print(f"  {t:<30} {100 * v:.1f}")
    print(f"  -> {Path(args.out_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
