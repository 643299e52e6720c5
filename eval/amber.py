"""AMBER: generative (CHAIR, Cover, Hal, Cog) and discriminative (yes/no, "no" positive) hallucination scores with
no judge model, following the official scorer (junyangwang0410/AMBER ``inference.py``) step by step.

    python -m eval.amber --answers outputs/amber/answers.jsonl --data-dir AMBER/data --out-dir outputs/amber

Answers: JSONL of ``{"id", "answer"}`` as ``eval.answer --benchmark amber`` writes them, or the official JSON list of
``{"id", "response"}``. Outputs ``samples.jsonl`` and ``results.json`` (exact fractions, and the official script's
printed numbers under ``official``); ``nlp.backend`` says whether the official NLTK/spaCy resources made them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.amber_nlp import SIMILARITY_THRESHOLD, SPACY_MODEL, AmberNLP, build_nlp
from eval.pope import normalize_yes_no as pope_yes_no
from eval.scoring import add_rerun_args, guard_out_dir, load_records, write_results
from utils.io import JsonlWriter, atomic_write_text, iter_jsonl

logger = logging.getLogger(__name__)

# Annotation type -> (dimension, attribute kind); inference.py sends every other discriminative type to relation.
TYPES = {
    "discriminative-hallucination": ("existence", None),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
    "discriminative-relation": ("relation", None),
    "relation": ("relation", None),
}
YES_NO_RULES = ("pope", "exact")


@dataclass(frozen=True)
class AmberData:
    """AMBER's published ``data/`` files: annotations by id, the word association, the safe words."""

    annotations: dict[int, dict[str, Any]]
    association: dict[str, list[str]]  # relation.json: object word -> the words that also name it
    safe_words: frozenset[str]  # safe_words.txt: never counted as hallucinations
    vocabulary: frozenset[str]  # every word of relation.json: the only nouns the scorer looks at

    @classmethod
    def load(cls, data_dir: str | Path) -> AmberData:
        root = Path(data_dir)
        for name in ("annotations.json", "relation.json", "safe_words.txt"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"--data-dir {root} has no {name}; point it at AMBER's data/ folder")
        anns = json.loads((root / "annotations.json").read_text(encoding="utf-8"))
        association = json.loads((root / "relation.json").read_text(encoding="utf-8"))
        for n, a in enumerate(anns):
            if a.get("type") == "generative":
                missing = [w for w in a["truth"] + a["hallu"] if w not in association]
                if missing:
                    raise ValueError(
                        f"annotations.json record {n} (id {a['id']}): {missing[0]!r} not in relation.json"
                    )
            elif a.get("type") not in TYPES or a.get("truth") not in ("yes", "no"):
                raise ValueError(f"annotations.json record {n} (id {a.get('id')}): unknown type or truth")
        # inference.py reads safe_words.txt line by line without stripping anything but the newline
        safe = frozenset(line for line in (root / "safe_words.txt").read_text(encoding="utf-8").split("\n"))
        vocab = frozenset(association) | frozenset(w for ws in association.values() for w in ws)
        return cls({a["id"]: a for a in anns}, association, safe, vocab)


def score_generative(objects: Sequence[str], ann: dict[str, Any], data: AmberData, nlp: AmberNLP) -> dict[str, Any]:
    """One description's counts, as inference.py's generative branch computes them.

    ``objects`` are the description's nouns that are in AMBER's vocabulary. A noun that is a safe word is skipped;
    one that names a true object (the object or a word relation.json associates with it) covers that object; else
    it covers the first hallucination target it names or is similar to (Cog), and it is a hallucination (CHAIR,
    Hal) unless it is similar to a true object's word, which that object then covers. A true or hallucination object
    listed twice is covered once, at its first entry, as in the official index lists.
    """
    truth, hallu = ann["truth"], ann["hallu"]
    # Candidate words with the object each stands for: the associated words of every object, then the objects.
    safe = [(w, i) for i, t in enumerate(truth) for w in data.association[t]] + [(t, i) for i, t in enumerate(truth)]
    targets = [(w, i) for i, h in enumerate(hallu) for w in data.association[h]] + [
        (h, i) for i, h in enumerate(hallu)
    ]
    covered, cog = [0] * len(truth), [0] * len(hallu)
    hallucinated: list[str] = []
    for noun in objects:
        if noun in data.safe_words:
            continue
        exact = next((i for w, i in safe if w == noun), None)
        if exact is not None:
            covered[exact] = 1
            continue
        exact_h = next((i for w, i in targets if w == noun), None)
        if exact_h is not None:
            cog[exact_h] = 1
        similar_h = next((i for w, i in targets if nlp.similar(noun, w)), None)
        if similar_h is not None:
            cog[similar_h] = 1
        similar = next((i for w, i in safe if nlp.similar(noun, w)), None)
        if similar is not None:
            covered[similar] = 1
        else:
            hallucinated.append(noun)
    return {
        "objects": list(objects),
        "hallucinated": hallucinated,
        "truth_covered": [t for t, c in zip(truth, covered) if c],
        "hallu_covered": [h for h, c in zip(hallu, cog) if c],
        "counts": {
            "chair": [len(hallucinated), len(objects)],
            "cover": [sum(covered), len(truth)],
            "cog": [sum(cog), len(hallu)],
            "hal": [int(bool(hallucinated)), 1],
        },
    }


def read_yes_no(text: str, rule: str) -> str | None:
    """The "Yes" / "No" inference.py compares with: ``exact`` takes only those two strings (anything else is
    neither, as the official script does); ``pope`` reads free-form answers with POPE's published rule."""
    if rule == "exact":
        return text if text in ("Yes", "No") else None
    if rule == "pope":
        return "No" if pope_yes_no(text) == "no" else "Yes"
    raise ValueError(f"unknown yes/no rule '{rule}'. Available: {', '.join(YES_NO_RULES)}")


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Exact fractions (None when undefined) and the official script's printed numbers, from scored samples."""
    gen = [s for s in samples if s.get("task") == "generative" and "error" not in s]
    dis = [s for s in samples if s.get("task") == "discriminative" and "error" not in s]
    totals = {k: [sum(s["counts"][k][i] for s in gen) for i in (0, 1)] for k in ("chair", "cover", "cog", "hal")}
    metrics: dict[str, Any] = {}
    if gen:
        metrics["generative"] = {k: _ratio(*totals[k]) for k in ("chair", "cover", "hal", "cog")} | {"n": len(gen)}
    groups = {"overall": dis}
    for dim in ("existence", "attribute", "state", "number", "action", "relation"):
        members = [s for s in dis if dim in (s["dimension"], s["attribute"])]
        if members:
            groups[dim] = members
    if dis:
        metrics["discriminative"] = {name: _confusion(members) for name, members in groups.items()}
    metrics["official"] = official_numbers(totals if gen else None, metrics.get("discriminative", {}))
    return metrics


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _confusion(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """inference.py's counters for one group ("no" is the positive class) and the exact ratios."""
    n = len(samples)
    correct = sum(s["read"] == s["truth"].capitalize() for s in samples)
    no_truth = sum(s["truth"] == "no" for s in samples)
    said_no = sum(s["read"] == "No" for s in samples)
    no_right = sum(s["read"] == "No" and s["truth"] == "no" for s in samples)
    p, r = _ratio(no_right, said_no), _ratio(no_right, no_truth)
    f1 = 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)
    return {
        "n": n,
        "counts": {"correct": correct, "truth_no": no_truth, "answered_no": said_no, "no_correct": no_right},
        "accuracy": _ratio(correct, n),
        "precision": p,
        "recall": r,
        "f1": f1,
    }


def official_numbers(gen: dict[str, list[int]] | None, dis: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers inference.py prints: percentages rounded to 0.1, every counter starting at metrics.txt's 0.001
    (so a denominator is the count + 0.001; attribute sums three of them, + 0.003), F1 from the rounded precision
    and recall with + 0.0001 in the denominator (+ 0.001 for existence, as published)."""
    out: dict[str, Any] = {}
    if gen is not None:
        out["generative"] = {
            "CHAIR": round(gen["chair"][0] / (gen["chair"][1] + 0.001) * 100, 1),
            "Cover": round(gen["cover"][0] / (gen["cover"][1] + 0.001) * 100, 1),
            "Hal": round(100 - (gen["hal"][1] - gen["hal"][0]) / (gen["hal"][1] + 0.001) * 100, 1),
            "Cog": round(gen["cog"][0] / (gen["cog"][1] + 0.001) * 100, 1),
        }
    for name, g in dis.items():
        c = g["counts"]
        eps = 0.003 if name == "attribute" else 0.001
        acc = round(c["correct"] / (g["n"] + eps) * 100, 1)
        p = round(c["no_correct"] / (c["answered_no"] + eps) * 100, 1)
        r = round(c["no_correct"] / (c["truth_no"] + eps) * 100, 1)
        f1_eps = 0.001 if name == "existence" else 0.0001
        f1 = round(2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + f1_eps) * 100, 1)
        out[name] = {"Accuracy": acc, "Precision": p, "Recall": r, "F1": f1}
    if "generative" in out and "overall" in out:  # the AMBER paper's summary: (100 - CHAIR + F1) / 2
        out["AMBER_score"] = round((100 - out["generative"]["CHAIR"] + out["overall"]["F1"]) / 2, 1)
    return out


def score_sample(rec: dict[str, Any], data: AmberData, nlp: AmberNLP, yes_no: str) -> dict[str, Any]:
    """One answer record -> its per-sample result (``error`` set when it cannot be scored)."""
    key = rec.get("id")
    ann = data.annotations.get(key) if isinstance(key, int) else None
    answer = rec.get("answer", rec.get("response"))
    base = {"id": key, "answer": answer}
    if ann is None:
        return {**base, "error": f"id {key!r} is not an AMBER annotation id (1..{len(data.annotations)})"}
    if not isinstance(answer, str):
        why = rec.get("error") or "no string 'answer' (or 'response')"
        return {**base, "task": _task(ann), "error": f"unanswered ({why}); rerun the answer stage"}
    if ann["type"] == "generative":
        objects = nlp.nouns(answer, data.vocabulary)
        return {**base, "task": "generative", "nlp": nlp.name, **score_generative(objects, ann, data, nlp)}
    dimension, attribute = TYPES[ann["type"]]
    read = read_yes_no(answer, yes_no)
    return {
        **base,
        "task": "discriminative",
        "dimension": dimension,
        "attribute": attribute,
        "truth": ann["truth"],
        "read": read,
        "yes_no": yes_no,
    }


def _task(ann: dict[str, Any]) -> str:
    return "generative" if ann["type"] == "generative" else "discriminative"


def evaluate_amber(
    answers: Sequence[dict[str, Any]],
    data_dir: str | Path,
    *,
    nlp: AmberNLP | str = "auto",
    yes_no: str = "pope",
    out_dir: str | Path | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score AMBER answers; returns ``{"metrics": ..., "samples": [...]}``.

    Args:
        answers: records with ``id`` (AMBER's integer id) and ``answer`` (or the official ``response``).
        data_dir: AMBER's ``data/`` folder (annotations.json, relation.json, safe_words.txt).
        nlp: an ``AmberNLP`` or ``"auto"`` / ``"official"`` / ``"offline"`` (see ``eval.amber_nlp``).
        yes_no: how discriminative answers become Yes/No: ``"pope"`` (free-form) or ``"exact"`` (official).
        out_dir: when given, ``samples.jsonl`` (resumable: finished records are kept) and ``results.json``.

    Example:
        >>> res = evaluate_amber([{"id": 1, "answer": "A man on a lake."}], "AMBER/data")  # doctest: +SKIP
        >>> res["metrics"]["official"]["generative"]["CHAIR"]  # doctest: +SKIP
    """
    started = time.time()
    if yes_no not in YES_NO_RULES:
        raise ValueError(f"unknown yes/no rule '{yes_no}'. Available: {', '.join(YES_NO_RULES)}")
    data = AmberData.load(data_dir)
    backend = build_nlp(nlp) if isinstance(nlp, str) else nlp
    answers = [_with_int_id(rec) for rec in answers]
    ids = _check_ids(answers)
    done: dict[Any, dict[str, Any]] = {}
    writer = None
    if out_dir is not None:
        path = Path(out_dir) / "samples.jsonl"
        old = list(iter_jsonl(path)) if path.exists() else []
        _check_resume(old, backend.name, yes_no, path)
        done = {r["id"]: r for r in old if "error" not in r}
        writer = JsonlWriter(path, key="id", fsync=False)  # deterministic scoring: a crash only costs a recompute
    samples = []
    for rec in answers:
        prev = done.get(rec["id"])
        if prev is not None and prev["answer"] == rec.get("answer", rec.get("response")):
            samples.append(prev)  # finished in an earlier run on the same answer
            continue
        s = score_sample(rec, data, backend, yes_no)
        samples.append(s)
        if writer is not None:
            writer.write(s)
    if writer is not None:
        writer.close()
        # one record per answer, in answer order: drops records of answers rescored since (fixed or changed)
        atomic_write_text(writer.path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    metrics = summarize(samples)
    metrics.update(n_records=len(ids), n_errors=sum("error" in s for s in samples), nlp=backend.describe())
    if out_dir is not None:
        config = {"data_dir": str(data_dir), "yes_no": yes_no, "nlp_backend": backend.name, **(extra_config or {})}
        write_results(
            out_dir,
            benchmark="amber",
            metrics=metrics,
            config=config,
            judge=None,
            started=started,
            protocol="official" if backend.name == "official" else "offline approximation (see docs/AMBER_POPE.md)",
        )
    return {"metrics": metrics, "samples": samples}


def _with_int_id(rec: dict[str, Any]) -> dict[str, Any]:
    key = rec.get("id")
    return {**rec, "id": int(key)} if isinstance(key, str) and key.isdigit() else rec


def _check_ids(answers: Sequence[dict[str, Any]]) -> list[Any]:
    ids = [rec.get("id") for rec in answers]
    seen: set[Any] = set()
    for n, key in enumerate(ids):
        if key is None:
            raise ValueError(f"--answers record {n} has no 'id'; AMBER answers carry the query's integer id")
        if key in seen:
            raise ValueError(f"--answers record {n} repeats id {key!r}; keep one answer per query")
        seen.add(key)
    return ids


def _check_resume(records: Any, backend: str, yes_no: str, path: Path) -> None:
    for r in records:
        if r.get("task") == "generative" and "nlp" in r and r["nlp"] != backend:
            raise ValueError(
                f"{path} was scored with the '{r['nlp']}' word processing, this run uses '{backend}'; "
                "use another --out-dir (or delete the file) so the two are not mixed"
            )
        if r.get("task") == "discriminative" and r.get("yes_no") not in (None, yes_no):
            raise ValueError(
                f"{path} was scored with --yes-no {r['yes_no']}, this run uses {yes_no}; "
                "use another --out-dir (or delete the file)"
            )


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="AMBER (generative and discriminative hallucination) scores; no judge.")
    p.add_argument("--answers", required=True, help="answers of eval.answer --benchmark amber, or the official list")
    p.add_argument("--data-dir", required=True, help="AMBER's data/ folder: annotations.json, relation.json, ...")
    p.add_argument("--out-dir", required=True, help="writes samples.jsonl and results.json here")
    p.add_argument(
        "--nlp",
        choices=["auto", "official", "offline"],
        default="auto",
        help="word processing: official NLTK + spaCy en_core_web_lg (published numbers), offline approximation "
        "(no model data, labelled in results.json), or auto (official when installed)",
    )
    p.add_argument("--similarity", type=float, default=SIMILARITY_THRESHOLD, help="official similarity threshold")
    p.add_argument("--spacy-model", default=SPACY_MODEL, help="spaCy pipeline whose vectors give the similarity")
    p.add_argument(
        "--yes-no",
        choices=YES_NO_RULES,
        default="pope",
        help="discriminative answers: pope reads free-form text as POPE does; exact accepts only 'Yes'/'No' "
        "(the official script, for answers already reduced to those words)",
    )
    add_rerun_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    args = make_parser().parse_args(argv)
    # refuses samples made from other inputs or settings (docs/RESUMING.md); changed answers are rescored in place
    guard_out_dir(args, None, benchmark="amber", per_record=("answers",))
    nlp = build_nlp(args.nlp, threshold=args.similarity, spacy_model=args.spacy_model)
    res = evaluate_amber(
        load_records(args.answers),
        args.data_dir,
        nlp=nlp,
        yes_no=args.yes_no,
        out_dir=args.out_dir,
        extra_config={"answers": str(args.answers), "similarity": args.similarity, "spacy_model": args.spacy_model},
    )
    m, off = res["metrics"], res["metrics"]["official"]
    print(f"AMBER ({m['n_records']} answers, {m['n_errors']} errors, word processing: {nlp.name}):")
    if "generative" in off:
        g = off["generative"]
        print(
            f"  generative ({m['generative']['n']}): CHAIR {g['CHAIR']}  Cover {g['Cover']}  Hal {g['Hal']}  "
            f"Cog {g['Cog']}"
        )
    for name in ("overall", "existence", "attribute", "state", "number", "action", "relation"):
        if name in off:
            d, n = off[name], m["discriminative"][name]["n"]
            print(
                f"  {name} ({n}): accuracy {d['Accuracy']}  precision {d['Precision']}  recall {d['Recall']}  "
                f"F1 {d['F1']}"
            )
    if "AMBER_score" in off:
        print(f"  AMBER score {off['AMBER_score']}")
    if nlp.name != "official":
        print("  (offline word processing: generative numbers approximate the official ones; see docs/AMBER_POPE.md)")
    print(f"  -> {Path(args.out_dir) / 'results.json'} (with the exact, unrounded fractions)")


if __name__ == "__main__":
    main()
