"""Exact evaluation on the synthetic world: Object HalBench CHAIR on held-out scenes and the labeler's accuracy.

    python -m muffin.world.evaluate --world runs/world --model runs/base --split test --out runs/base/eval_test

Descriptions are scored by ``eval.chair`` (the Object HalBench code) with the world's COCO instances and synonym
table, unchanged; next to it ``metrics.world_metrics`` checks what CHAIR does not (instances with colour and count,
place sentences), per hallucination source. The labeler is scored on the yes/no questions the rule-based backends
make from descriptions' claims, against the truth that ``questions.oracle_truth`` reads off the scene's ground truth.
With ``--pope`` the model also answers POPE's yes/no object questions on the scenes (``questions.pope_records``),
scored by ``eval.pope``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from muffin.decoding import Decoding
from muffin.family import ModelFamily, Sample
from muffin.world.captions import DEFAULT_CAPTIONS, CaptionConfig, describe, world_captions
from muffin.world.metrics import world_metrics
from muffin.world.oracle import roc_auc, yes_share
from muffin.world.questions import POPE_STRATEGIES, oracle_truth, pope_records
from muffin.world.scenes import Scene, load_scenes
from utils.images import load_image
from utils.io import atomic_write_json, atomic_write_text, read_jsonl, write_manifest

logger = logging.getLogger(__name__)

# Greedy with a length cap: the world's descriptions are under 60 tokens. (LLaVA's chat decoding, 3 beams, gives
# the same ranking here at three times the cost; pass --num-beams 3 to use it.)
WORLD_DECODING = Decoding(max_new_tokens=96)


def chair_scores(
    world_dir: str | Path, split: str, answers: Sequence[dict[str, Any]], out_dir: str | Path | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Object HalBench (``eval.objhal``, rule extraction) of ``answers`` against the split's COCO ground truth.

    Args:
        answers: records with ``id``, ``image_id``, ``question`` and ``answer``.
        out_dir: where ``eval.objhal`` writes ``samples.jsonl`` and ``results.json`` (optional).
    Returns:
        (metrics, per-answer samples): ``chair_i`` (mention level), ``chair_s`` and ``response_hallucination``
        (response level), ``recall``, ``mean_length``, ... (``eval.chair.chair_summary``).
    """
    from eval.objhal import evaluate_objhal

    world = Path(world_dir)
    res = evaluate_objhal(
        answers,
        world / split / "instances.json",
        synonyms_path=world / "synonyms.txt",
        protocol="ours",  # the world's own synonym table and rule extraction; the paper protocol is COCO's
        out_dir=out_dir,
        extra_config={"world": str(world), "split": split},
    )
    if res["metrics"].get("n_errors"):
        bad = next(s for s in res["samples"] if "error" in s)
        raise ValueError(
            f"{res['metrics']['n_errors']} answers could not be scored against {world / split}, e.g. "
            f"{bad['error']}; score answers against the split their prompts came from"
        )
    return res["metrics"], res["samples"]


def describe_split(
    family: ModelFamily,
    world_dir: str | Path,
    split: str,
    *,
    decoding: Decoding = WORLD_DECODING,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Answer the split's description prompts; records carry ``id``, ``image_id``, ``question``, ``answer``."""
    from muffin.inference import generate

    world = Path(world_dir)
    prompts = read_jsonl(world / split / "prompts.jsonl")[:limit]
    samples = [
        Sample(load_image(world / p["image_path"], what=f"prompt '{p['ds_question_id']}'"), p["question"])
        for p in prompts
    ]
    answers = generate(family, samples, decoding, batch_size=batch_size, progress=progress)
    return [
        {"id": p["ds_question_id"], "image_id": p["metainfos"]["image_id"], "question": p["question"], "answer": a}
        for p, a in zip(prompts, answers)
    ]


def claim_questions(
    scenes: Sequence[Scene], *, seed: int = 0, per_scene: int = 2, captions: CaptionConfig = DEFAULT_CAPTIONS
) -> list[dict[str, Any]]:
    """Yes/no questions of the kind the loop asks: rule-split claims of biased descriptions, rule-made questions.

    Each record: ``image_id``, ``claim``, ``question``, ``truth`` (from the scene's ground truth). Descriptions
    are drawn with a hallucination rate of 1/2, so about half of the scenes with an absent partner add a false claim.
    """
    from muffin.feedback.rules import claim_to_question_rule, split_claims_rule

    rng = random.Random(f"claims:{seed}")
    out = []
    for sc in scenes:
        for _ in range(per_scene):
            text, _fake = describe(sc, rng, replace(captions, hallucination_rate=0.5))
            for claim in split_claims_rule(text):
                q = claim_to_question_rule(claim)
                truth = oracle_truth(sc, q)
                if truth is not None:
                    out.append({"image_id": sc.image_id, "claim": claim, "question": q, "truth": truth})
    return out


def labeler_accuracy(
    family: ModelFamily,
    world_dir: str | Path,
    split: str,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Accuracy of ``family`` as a yes/no labeler (P(yes) > P(no)) on ``claim_questions`` of a split's scenes."""
    from muffin.inference import yes_no_probs

    world = Path(world_dir)
    scenes = {s.image_id: s for s in load_scenes(world, split)[:limit]}
    qs = claim_questions(list(scenes.values()), captions=world_captions(world))
    images = {i: load_image(world / split / "images" / s.file_name) for i, s in scenes.items()}
    probs = yes_no_probs(
        family, [Sample(images[q["image_id"]], q["question"]) for q in qs], batch_size=batch_size, progress=progress
    )
    for q, (p_yes, p_no) in zip(qs, probs):
        q.update(p_yes=round(p_yes, 5), p_no=round(p_no, 5), said_yes=p_yes > p_no)
    return accuracy_summary(qs), qs


def accuracy_summary(labelled: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of ``said_yes`` against ``truth``: overall, on true and on false claims, and their mean; with
    ``p_yes``/``p_no`` on the rows, the ``auc`` of P(yes) / (P(yes) + P(no)) for true vs false claims, as
    ``oracle.feedback_accuracy`` reports it for the loop."""

    def acc(rows: list[dict[str, Any]]) -> float:
        return sum(r["said_yes"] == r["truth"] for r in rows) / len(rows) if rows else float("nan")

    def shares(rows: list[dict[str, Any]]) -> list[float]:
        found = (yes_share(r["p_yes"], r["p_no"]) for r in rows if "p_yes" in r and "p_no" in r)
        return [x for x in found if x is not None]

    true_rows = [r for r in labelled if r["truth"]]
    false_rows = [r for r in labelled if not r["truth"]]
    return {
        "accuracy": acc(list(labelled)),
        "accuracy_true_claims": acc(true_rows),
        "accuracy_false_claims": acc(false_rows),
        "balanced_accuracy": (acc(true_rows) + acc(false_rows)) / 2,
        "n": len(labelled),
        "n_false": len(false_rows),
        "auc": roc_auc(shares(true_rows), shares(false_rows)),
    }


# Yes/no answers need a few tokens; greedy as the descriptions.
POPE_DECODING = Decoding(max_new_tokens=8)


def pope_split(
    family: ModelFamily,
    world_dir: str | Path,
    split: str,
    *,
    limit: int | None = None,
    per_scene: int = 3,
    batch_size: int = 32,
    progress: bool = True,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """POPE on a split's scenes: the model answers ``questions.pope_records`` of each negative-sampling strategy
    (free-form, ``POPE_DECODING``), scored by ``eval.pope`` with POPE's published yes/no reading; returns its
    metrics (per strategy and their mean) and writes ``samples.jsonl`` / ``results.json`` to ``out_dir``."""
    from eval.pope import score_answers
    from eval.scoring import write_results
    from muffin.inference import generate

    started = time.time()
    world = Path(world_dir)
    scenes = load_scenes(world, split)[:limit]
    questions = [
        {**r, "id": f"{strategy}/{r['question_id']}", "split": strategy}
        for strategy in POPE_STRATEGIES
        for r in pope_records(scenes, strategy, per_scene=per_scene)
    ]
    images = {sc.file_name: load_image(world / split / "images" / sc.file_name) for sc in scenes}
    samples = [Sample(images[q["image"].rsplit("/", 1)[-1]], q["text"]) for q in questions]
    texts = generate(family, samples, POPE_DECODING, batch_size=batch_size, progress=progress)
    scored, metrics = score_answers([{"id": q["id"], "answer": t} for q, t in zip(questions, texts)], questions)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in scored))
        config = {"world": str(world), "split": split, "limit": limit, "per_scene": per_scene}
        write_results(out, benchmark="pope", metrics=metrics, config=config, judge=None, started=started)
    return metrics


def evaluate_model(
    family: ModelFamily,
    world_dir: str | Path,
    split: str,
    out_dir: str | Path | None = None,
    *,
    decoding: Decoding = WORLD_DECODING,
    limit: int | None = None,
    labeler: bool = False,
    pope: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """CHAIR and the instance / count / colour / place checks (``world_metrics``) on the split's description
    prompts (with ``labeler``, yes/no accuracy on claim questions; with
    ``pope``, the POPE scores of ``pope_split``); writes files to out_dir."""
    started = time.time()
    answers = describe_split(
        family, world_dir, split, decoding=decoding, limit=limit, batch_size=batch_size, progress=progress
    )
    out = Path(out_dir) if out_dir is not None else None
    summary, _ = chair_scores(world_dir, split, answers, out / "objhal" if out else None)
    scenes = {s.image_id: s for s in load_scenes(world_dir, split)}
    result: dict[str, Any] = {"split": split, "chair": summary, "world": world_metrics(answers, scenes)}
    if labeler:
        result["labeler"], labelled = labeler_accuracy(
            family, world_dir, split, limit=limit, batch_size=batch_size, progress=progress
        )
        if out is not None:
            atomic_write_text(out / "labeler.jsonl", "".join(json.dumps(q) + "\n" for q in labelled))
    if pope:
        result["pope"] = pope_split(
            family,
            world_dir,
            split,
            limit=limit,
            batch_size=batch_size,
            progress=progress,
            out_dir=out / "pope" if out else None,
        )
    if out is not None:
        atomic_write_text(out / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in answers))
        atomic_write_json(out / "results.json", result)
        write_manifest(
            out / "manifest.json",
            stage="world_evaluate",
            config={"split": split, "limit": limit, "decoding": decoding.as_dict()},
            counts={"answers": len(answers)},
            started=started,
        )
    return result


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a checkpoint on the synthetic world (CHAIR, instance / count / colour / place checks per "
        "hallucination source, optionally labeler accuracy and POPE)."
    )
    p.add_argument("--world", required=True)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--split", default="test", choices=["sft", "feedback", "val", "test"])
    p.add_argument("--out", default=None, help="write answers.jsonl / labeler.jsonl / results.json here")
    p.add_argument("--limit", type=int, default=None, help="first N scenes only")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--labeler", action="store_true", help="also measure yes/no accuracy on rule-made claim questions")
    p.add_argument("--pope", action="store_true", help="also score POPE-style yes/no object questions (no judge)")
    p.add_argument("--batch-size", type=int, default=32)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from muffin.family import load_family
    from utils.dist import setup_logging

    setup_logging()
    a = make_parser().parse_args(argv)
    family = load_family(a.model)
    res = evaluate_model(
        family,
        a.world,
        a.split,
        a.out,
        decoding=WORLD_DECODING.replace(num_beams=a.num_beams),
        limit=a.limit,
        labeler=a.labeler,
        pope=a.pope,
        batch_size=a.batch_size,
    )
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
