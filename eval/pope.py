"""POPE: yes/no object probing (random / popular / adversarial splits), scored without any judge model.

    python -m eval.pope --answers outputs/pope/answers.jsonl \\
        --questions data/pope/coco_pope_random.json data/pope/coco_pope_popular.json \\
        data/pope/coco_pope_adversarial.json --out-dir outputs/pope

Answers: JSONL of ``{"id", "answer"}`` as ``eval.answer --benchmark pope`` writes them (``id`` is
``<split>/<question_id>``). Free-form answers are read as yes/no with POPE's published rule (``normalize_yes_no``).
Outputs ``samples.jsonl`` and ``results.json`` (accuracy, precision, recall, F1, yes-ratio per split; "yes" positive).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from eval.scoring import add_rerun_args, fmt, guard_out_dir, load_records, write_results
from utils.io import atomic_write_text

SPLITS = ("random", "popular", "adversarial")  # POPE's negative-sampling strategies, in the paper's order


def normalize_yes_no(text: str) -> str:
    """POPE's answer normalisation (AoiDragon/POPE ``evaluate.py``): "no" or "yes".

    Only the text before the first period counts; commas are removed; the answer is "no" when one of the
    space-separated words is exactly ``No``, ``no`` or ``not``, and "yes" otherwise (case-sensitive, as published:
    "NO" or "Not." read as "yes").

    Example:
        >>> normalize_yes_no("No, there is no dog in the image.")
        'no'
        >>> normalize_yes_no("There is a dog.")
        'yes'
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def split_of(path: str | Path) -> str:
    """The split a POPE question file holds, from its name: ``coco_pope_adversarial.json`` -> ``adversarial``."""
    stem = Path(path).stem
    m = re.search(r"pope_(\w+)$", stem)
    return m.group(1) if m else stem


def question_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The question files of ``paths``: files as given; a folder stands for its ``*pope_*.json`` files, in POPE's
    split order (random, popular, adversarial, then any other by name)."""
    out: list[Path] = []
    for path in [paths] if isinstance(paths, str | Path) else paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("*pope_*.json"), key=lambda f: (_split_rank(split_of(f)), f.name))
            if not found:
                raise FileNotFoundError(f"no POPE question file (*pope_<split>.json) in folder '{path}'")
            out.extend(found)
        else:
            out.append(path)
    return out


def _split_rank(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


def load_questions(paths: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """POPE question files or folders (JSON lines ``question_id, image, text, label``; a JSON list also works).

    Each record gets ``id = <split>/<question_id>`` (question ids restart at 1 in every split file) and ``split``.
    """
    files = question_files(paths)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in files:
        split = split_of(path)
        for n, rec in enumerate(load_records(path, what="--questions")):
            missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
            if missing:
                raise ValueError(
                    f"{path} record {n}: no field {missing[0]!r}; POPE questions have question_id, image, text, label"
                )
            if rec["label"] not in ("yes", "no"):
                raise ValueError(f"{path} record {n}: label {rec['label']!r} is not 'yes' or 'no'")
            key = f"{split}/{rec['question_id']}"
            if key in seen:
                raise ValueError(
                    f"{path} record {n}: id {key!r} appears twice; give each split file its own name "
                    "(coco_pope_<split>.json)"
                )
            seen.add(key)
            out.append({**rec, "id": key, "split": split})
    return out


def confusion_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio of ``(prediction, label)`` pairs with "yes" as the positive
    class, as POPE's ``evaluate.py`` computes them; a ratio whose denominator is 0 is None."""
    tp = fp = tn = fn = 0
    for pred, label in pairs:
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if n else None)
    return {
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": (tp + tn) / n if n else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else None,
    }


def score_answers(
    answers: Sequence[dict[str, Any]], questions: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-question records and per-split metrics (plus ``mean`` over the splits present, the way papers average).

    An answer matches its question by ``id`` (``<split>/<question_id>``); a question without an answer, or whose
    answer is not a string (the answer stage failed), is counted in ``n_missing`` / ``n_errors`` and left out.
    """
    by_id = {}
    for n, rec in enumerate(answers):
        key = rec.get("id")
        if key is None:
            raise ValueError(f"--answers record {n} has no 'id'; answers of eval.answer --benchmark pope carry it")
        by_id[str(key)] = rec
    samples, missing = [], 0
    for q in questions:
        rec = by_id.get(q["id"])
        if rec is None:
            missing += 1
            continue
        base = {"id": q["id"], "split": q["split"], "question": q["text"], "label": q["label"]}
        answer = rec.get("answer", rec.get("text"))
        if not isinstance(answer, str):
            why = rec.get("error") or "no string 'answer'"
            samples.append({**base, "answer": answer, "error": f"unanswered ({why}); rerun the answer stage"})
            continue
        pred = normalize_yes_no(answer)
        samples.append({**base, "answer": answer, "prediction": pred, "correct": pred == q["label"]})
    metrics = summarize(samples)
    metrics.update(n_questions=len(questions), n_missing=missing)
    return samples, metrics


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-split confusion metrics of scored samples, in POPE's split order, and their unweighted mean."""
    scored = [s for s in samples if "error" not in s]
    names = [s for s in SPLITS if any(x["split"] == s for x in scored)]
    names += sorted({x["split"] for x in scored} - set(names))
    per = {s: confusion_metrics((x["prediction"], x["label"]) for x in scored if x["split"] == s) for s in names}
    mean = {
        k: sum(per[s][k] for s in names) / len(names) if names and all(per[s][k] is not None for s in names) else None
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")
    }
    return {"splits": per, "mean": mean, "n_scored": len(scored), "n_errors": len(samples) - len(scored)}


def write_samples(path: Path, samples: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``path`` with this run's records (scoring is deterministic and fast: a changed answer's record is
    replaced, never left stale next to the new metrics)."""
    atomic_write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def evaluate_pope(
    answers: Sequence[dict[str, Any]],
    questions_paths: str | Path | Sequence[str | Path],
    *,
    out_dir: str | Path | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score POPE answers; returns ``{"metrics": ..., "samples": [...]}``; writes ``samples.jsonl`` and
    ``results.json`` into ``out_dir`` when given (a rerun rewrites nothing already scored).

    Example:
        >>> res = evaluate_pope(read_jsonl("answers.jsonl"), ["coco_pope_random.json"])  # doctest: +SKIP
        >>> res["metrics"]["splits"]["random"]["f1"]  # doctest: +SKIP
    """
    started = time.time()
    paths = question_files(questions_paths)
    questions = load_questions(paths)
    samples, metrics = score_answers(answers, questions)
    if out_dir is not None:
        write_samples(Path(out_dir) / "samples.jsonl", samples)
        config = {
            "questions": [str(p) for p in paths],
            "normalization": "POPE evaluate.py: first sentence; 'No'/'no'/'not' as a word -> no, else yes",
            "positive_class": "yes",
            **(extra_config or {}),
        }
        write_results(out_dir, benchmark="pope", metrics=metrics, config=config, judge=None, started=started)
    return {"metrics": metrics, "samples": samples}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="POPE (yes/no object probing) of a model's answers; no judge needed.")
    p.add_argument("--answers", required=True, help="answers JSONL of eval.answer --benchmark pope (id, answer)")
    p.add_argument(
        "--questions",
        nargs="+",
        required=True,
        help="POPE question files (coco_pope_<split>.json) or a folder of them: the labels, and each split by file name",
    )
    p.add_argument("--out-dir", required=True, help="writes samples.jsonl and results.json here")
    add_rerun_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    args = make_parser().parse_args(argv)
    # refuses samples made from other inputs or settings (docs/RESUMING.md); changed answers are rescored in place
    guard_out_dir(args, None, benchmark="pope", per_record=("answers",))
    res = evaluate_pope(
        load_records(args.answers), args.questions, out_dir=args.out_dir, extra_config={"answers": str(args.answers)}
    )
    m = res["metrics"]
    print(f"POPE ({m['n_scored']} scored, {m['n_errors']} unanswered, {m['n_missing']} without an answer):")
    for name, s in [*m["splits"].items(), ("mean", m["mean"])]:
        print(
            f"  {name:<12} accuracy {fmt(s['accuracy'])}  precision {fmt(s['precision'])}  recall {fmt(s['recall'])}"
            f"  F1 {fmt(s['f1'])}  yes-ratio {fmt(s['yes_ratio'])}"
        )
    print(f"  -> {Path(args.out_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
