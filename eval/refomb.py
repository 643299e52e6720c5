"""RefoMB: pairwise judging against GPT-4V reference answers, given a hidden detailed image description.

    python -m eval.refomb overall --answers outputs/refomb/answers.jsonl \\
        --reference ../shared/reference/data/rlaifv-original/eval/gpt4v_RefoMB_dev_0521.jsonl \\
        --runs 3 --judge openai --judge-model gpt-4-1106-preview --out-dir outputs/refomb/overall
    python -m eval.refomb hall --reviews outputs/refomb/overall/samples.jsonl \\
        --judge openai --judge-model gpt-4-1106-preview --out-dir outputs/refomb/hall

Pass ``overall``: model A = the reference answer, model B = the evaluated model; the judge ends with ``[[A]]``,
``[[B]]`` or ``[[C]]`` (tie), item score s = -1 / +1 / 0 and the overall score is mean((s+1)/2), the model's win
rate with ties as half. Pass ``hall`` reads each review and decides which answer hallucinates less; the same
formula gives the trustworthiness score. Repeated runs (``--runs``) are separate judge calls; the results
carry their mean, spread and per-type scores, as the published protocol asks.
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
from eval.parsers import choice_score, parse_choice
from eval.prompts import (
    REFOMB_HALLUCINATION_SYSTEM,
    REFOMB_PAIRWISE_SYSTEM,
    load_prompt,
    refomb_hallucination_user,
    refomb_pairwise_user,
)
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

JUDGE_MAX_TOKENS = 2048
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
) -> list[dict[str, Any]]:
    """Pairwise verdicts of every (item, run) not yet in ``store``; returns all records in (run, item) order."""
    jobs = [(it, r) for r in range(runs) for it in items]
    for part in chunks(store.todo(jobs, key=lambda j: _base(*j)["id"]), chunk_size):
        ok = [(it, r) for it, r in part if "error" not in it]
        reqs = [
            JudgeRequest.chat(
                system=system,
                user=refomb_pairwise_user(it["description"], it["question"], it["reference"], it["model_answer"]),
                temperature=0.0,
                max_tokens=max_tokens,
                attempt=RUN_STRIDE * r,
            )
            for it, r in ok
        ]
        verdicts = dict(
            zip([_base(*j)["id"] for j in ok], ask_and_parse(judge, reqs, parse_choice, reasks=reasks, progress=True))
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


def score_hallucination(
    reviews: Sequence[dict[str, Any]],
    judge: Judge,
    store: SampleStore,
    *,
    system: str = REFOMB_HALLUCINATION_SYSTEM,
    reasks: int = 2,
    chunk_size: int = 32,
    max_tokens: int = JUDGE_MAX_TOKENS,
) -> list[dict[str, Any]]:
    """Second pass over the overall pass's records: which answer has fewer hallucinations, per review."""
    for part in chunks(store.todo(reviews), chunk_size):
        ok = [rv for rv in part if rv.get("review")]
        reqs = [
            JudgeRequest.chat(
                system=system,
                user=refomb_hallucination_user(rv["review"]),
                temperature=0.0,
                max_tokens=max_tokens,
                attempt=RUN_STRIDE * int(rv.get("run", 0)),
            )
            for rv in ok
        ]
        verdicts = dict(
            zip([rv["id"] for rv in ok], ask_and_parse(judge, reqs, parse_choice, reasks=reasks, progress=True))
        )
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
    """Score = mean((s+1)/2) per run, overall and per type; across runs: mean, sample std, min, max.

    Records without a score (no answer, judge failure, no verdict) are left out and counted in ``n_unscored``;
    a run with nothing scored has score None and is left out of the mean and spread.
    """
    runs: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        runs.setdefault(int(r.get("run", 0)), []).append(r)
    per_run = {}
    for run, recs in sorted(runs.items()):
        scored = [(r["type"], (r["score"] + 1) / 2) for r in recs if r.get("score") is not None]
        per_run[run] = {
            "score": sum(v for _, v in scored) / len(scored) if scored else None,
            "score_by_type": group_mean(scored),
            "wins": sum(r.get("choice") == "B" for r in recs),
            "ties": sum(r.get("choice") == "C" for r in recs),
            "losses": sum(r.get("choice") == "A" for r in recs),
            "n_scored": len(scored),
            "n_unscored": len(recs) - len(scored),
        }
    scores = [v["score"] for v in per_run.values() if v["score"] is not None]
    types = sorted({t for v in per_run.values() for t in v["score_by_type"]})
    return {
        "score": statistics.fmean(scores) if scores else None,
        "score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0 if scores else None,
        "score_min": min(scores, default=None),
        "score_max": max(scores, default=None),
        "score_by_type": {
            t: statistics.fmean([v["score_by_type"][t] for v in per_run.values() if t in v["score_by_type"]])
            for t in types
        },
        "n_runs": len(per_run),
        "runs": per_run,
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="RefoMB pairwise evaluation against reference answers.")
    sub = p.add_subparsers(dest="stage", required=True)
    o = sub.add_parser("overall", help="pairwise pass: reference (A) versus the model (B)")
    o.add_argument("--answers", required=True, help="answers JSONL: id (or image_url + question), answer")
    o.add_argument("--reference", required=True, help="gpt4v_RefoMB_dev_0521.jsonl (reference answers)")
    o.add_argument("--runs", type=int, default=1, help="repeated judge runs, averaged with their spread")
    h = sub.add_parser("hall", help="hallucination pass over the reviews of an overall pass")
    h.add_argument("--reviews", required=True, help="samples.jsonl of the overall pass")
    for sp in (o, h):
        sp.add_argument("--prompt-file", default=None, help="judge system prompt (default: ours)")
        sp.add_argument("--reasks", type=int, default=2, help="re-asks after an answer without [[A/B/C]]")
        sp.add_argument("--out-dir", required=True, help="writes samples.jsonl and results.json here")
        add_judge_args(sp)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    args = make_parser().parse_args(argv)
    started = time.time()
    judge = build_judge(args, Path(args.out_dir) / "judge_cache.sqlite")
    store = SampleStore(Path(args.out_dir) / "samples.jsonl")
    max_tokens = args.judge_max_tokens or JUDGE_MAX_TOKENS
    if args.stage == "overall":
        system, source = load_prompt(args.prompt_file, REFOMB_PAIRWISE_SYSTEM)
        items = attach_answers(load_refomb_items(args.reference), load_records(args.answers))
        records = score_overall(
            items, judge, store, runs=args.runs, system=system, reasks=args.reasks, max_tokens=max_tokens
        )
        config = {
            "answers": str(args.answers),
            "reference": str(args.reference),
            "runs": args.runs,
            "max_tokens": max_tokens,
        }
    else:
        system, source = load_prompt(args.prompt_file, REFOMB_HALLUCINATION_SYSTEM)
        records = score_hallucination(
            load_records(args.reviews, what="--reviews"),
            judge,
            store,
            system=system,
            reasks=args.reasks,
            max_tokens=max_tokens,
        )
        config = {"reviews": str(args.reviews), "max_tokens": max_tokens}
    store.close()
    metrics = summarize(records)
    write_results(
        args.out_dir,
        benchmark=f"refomb-{args.stage}",
        metrics=metrics,
        config={**config, "prompt": source, "reasks": args.reasks},
        judge=judge,
        started=started,
    )
    name = "overall" if args.stage == "overall" else "trustworthiness"
    print(
        f"RefoMB {name} score {fmt(metrics['score'])} (std {fmt(metrics['score_std'])} over {metrics['n_runs']} runs; "
        f"scored per run: {[r['n_scored'] for r in metrics['runs'].values()]}; prompt: {source})"
    )
    for t, v in metrics["score_by_type"].items():
        print(f"  {t:<30} {100 * v:.1f}")
    print(f"  -> {Path(args.out_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
