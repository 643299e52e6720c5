"""Ground-truth feedback for the pipeline's claims: the labeler's accuracy, and oracle verdicts in its place.

The feedback pipeline asks one yes/no question per claim (``questions.jsonl`` of the changeq stage) and the
labeler answers it (``checked.jsonl`` of the conquer stage). On the synthetic world the true answer is known:
``questions.oracle_truth`` reads the question against the scene. ``feedback_accuracy`` scores the labeler's
verdicts; ``oracle_check`` writes verdicts from the ground truth in the conquer stage's format, for the
"AI feedback vs oracle feedback" comparison.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muffin.world.questions import oracle_truth
from muffin.world.scenes import Scene, load_scenes
from utils.io import atomic_write_text, read_jsonl

logger = logging.getLogger(__name__)


class WorldTruth:
    """Scenes of a world by prompt id (``ds_question_id`` of the world's prompt files)."""

    def __init__(self, world_dir: str | Path) -> None:
        world = Path(world_dir)
        if not (world / "synonyms.txt").is_file():
            raise FileNotFoundError(
                f"'{world}' is not a world directory (no synonyms.txt); build one with "
                "python -m muffin.world.build --out DIR"
            )
        scenes: dict[int, Scene] = {}
        self.image_of: dict[str, int] = {}
        for split_dir in sorted(p for p in world.iterdir() if (p / "scenes.jsonl").is_file()):
            scenes.update({s.image_id: s for s in load_scenes(world, split_dir.name)})
            if (split_dir / "prompts.jsonl").is_file():
                self.image_of.update(
                    {r["ds_question_id"]: r["image_id"] for r in read_jsonl(split_dir / "prompts.jsonl")}
                )
        self.scenes = scenes

    def scene(self, prompt_id: str) -> Scene:
        if prompt_id not in self.image_of:
            raise KeyError(
                f"prompt '{prompt_id}' is not a prompt of this world; oracle feedback needs the world's own "
                "prompt files (<world>/<split>/prompts.jsonl)"
            )
        return self.scenes[self.image_of[prompt_id]]

    def truths(self, rec: dict[str, Any]) -> list[bool | None]:
        """Ground truth of each question of a changeq/conquer record (None: the question names no world object)."""
        scene = self.scene(rec["prompt_id"])
        return [oracle_truth(scene, q) for q in rec.get("questions") or []]


def feedback_accuracy(checked: Sequence[dict[str, Any]], truth: WorldTruth) -> dict[str, Any]:
    """The labeler's verdicts on claims against the ground truth (records of the conquer stage).

    Returns accuracy over all judged claims, on true and on false claims, their mean (balanced accuracy), the
    counts, the share of questions the oracle cannot read (they mention no object of the world) and, when the
    records carry ``p_yes``/``p_no``, the ``auc`` of P(yes) / (P(yes) + P(no)) for telling true claims from false
    ones (0.5: the read-out carries no signal, whatever the threshold).
    """
    hits = {True: [0, 0], False: [0, 0]}  # truth -> [correct, total]
    scores: dict[bool, list[float]] = {True: [], False: []}
    unreadable = 0
    for rec in checked:
        if rec.get("error") or not rec.get("verdicts"):
            continue
        p_yes, p_no = rec.get("p_yes") or [], rec.get("p_no") or []
        for i, (verdict, t) in enumerate(zip(rec["verdicts"], truth.truths(rec))):
            if t is None:
                unreadable += 1
                continue
            hits[t][0] += verdict == t
            hits[t][1] += 1
            share = yes_share(p_yes[i], p_no[i]) if i < len(p_yes) and i < len(p_no) else None
            if share is not None:
                scores[t].append(share)
    n = hits[True][1] + hits[False][1]
    acc_t = hits[True][0] / hits[True][1] if hits[True][1] else float("nan")
    acc_f = hits[False][0] / hits[False][1] if hits[False][1] else float("nan")
    return {
        "accuracy": (hits[True][0] + hits[False][0]) / n if n else float("nan"),
        "accuracy_true_claims": acc_t,
        "accuracy_false_claims": acc_f,
        "balanced_accuracy": (acc_t + acc_f) / 2,
        "claims": n,
        "false_claims": hits[False][1],
        "unreadable_questions": unreadable,
        "auc": roc_auc(scores[True], scores[False]),
    }


def yes_share(p_yes: float, p_no: float) -> float | None:
    """P(yes) / (P(yes) + P(no)), the read-out's score for "the claim holds"; None when both are 0."""
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else None


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(a random positive scores above a random negative), ties counting one half; None when a side is empty."""
    if not positives or not negatives:
        return None
    neg = sorted(negatives)
    wins = sum(
        bisect.bisect_left(neg, p) + 0.5 * (bisect.bisect_right(neg, p) - bisect.bisect_left(neg, p))
        for p in positives
    )
    return wins / (len(positives) * len(negatives))


def oracle_check(questions: Sequence[dict[str, Any]], truth: WorldTruth, out_path: str | Path) -> list[dict[str, Any]]:
    """Conquer-stage records whose verdicts come from the ground truth (a question the oracle cannot read is
    judged true: the oracle does not penalise what it cannot check). Written atomically to ``out_path``."""
    out = []
    for rec in questions:
        if rec.get("error"):
            out.append(rec)
            continue
        verdicts = [t is not False for t in truth.truths(rec)]
        n_false = sum(1 for v in verdicts if not v)
        out.append(
            {
                **rec,
                "p_yes": [float(v) for v in verdicts],
                "p_no": [float(not v) for v in verdicts],
                "verdicts": verdicts,
                "n_false": n_false,
                "score": -n_false,
                "labeler": "oracle",
            }
        )
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    logger.info(
        "oracle feedback: %d answers, %d claims judged false -> %s",
        len(out),
        sum(r.get("n_false", 0) for r in out),
        out_path,
    )
    return out
