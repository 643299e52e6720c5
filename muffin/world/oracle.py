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

from muffin.world.questions import count_of, oracle_truth, parse_mentions
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


CLAIM_KINDS = ("object", "colour", "count", "place")


def claim_kind(question: str) -> str:
    """What a claim question asserts beyond an object's existence: ``place`` (a position), ``count`` (a number other
    than one), ``colour``, else ``object`` (the class alone, negated claims included)."""
    mentions = parse_mentions(question)
    if any(where for *_, where in mentions):
        return "place"
    if any(count != 1 for count, *_ in mentions):
        return "count"
    if any(colour for _, colour, _, _ in mentions):
        return "colour"
    return "object"


def _names_absent_object(scene: Scene, question: str) -> bool:
    return any(count_of(scene, cls) == 0 for _, _, cls, _ in parse_mentions(question))


def feedback_accuracy(checked: Sequence[dict[str, Any]], truth: WorldTruth) -> dict[str, Any]:
    """The labeler's verdicts on claims against the ground truth (records of the conquer stage).

    Returns accuracy over all judged claims, on true and on false claims, their mean (balanced accuracy), the
    counts, the share of questions the oracle cannot read (they mention no object of the world) and, when the
    records carry ``p_yes``/``p_no``, the ``auc`` of P(yes) / (P(yes) + P(no)) for telling true claims from false
    ones (0.5: the read-out carries no signal, whatever the threshold). Also ``by_kind`` (``claim_kind``: claims,
    share false, accuracy, AUC for each kind) and ``absent_object_auc``: true claims against false claims naming an
    object absent from the scene, the error CHAIR counts (the rest are wrong colours, counts and places).
    """
    hits = {True: [0, 0], False: [0, 0]}  # truth -> [correct, total]
    scores: dict[bool, list[float]] = {True: [], False: []}
    kinds = {k: {"hits": {True: [0, 0], False: [0, 0]}, "scores": {True: [], False: []}} for k in CLAIM_KINDS}
    absent_scores: list[float] = []
    unreadable = 0
    for rec in checked:
        if rec.get("error") or not rec.get("verdicts"):
            continue
        p_yes, p_no = rec.get("p_yes") or [], rec.get("p_no") or []
        scene = truth.scene(rec["prompt_id"])
        for i, (verdict, t) in enumerate(zip(rec["verdicts"], truth.truths(rec))):
            if t is None:
                unreadable += 1
                continue
            kind = kinds[claim_kind(rec["questions"][i])]
            for h in (hits, kind["hits"]):
                h[t][0] += verdict == t
                h[t][1] += 1
            share = yes_share(p_yes[i], p_no[i]) if i < len(p_yes) and i < len(p_no) else None
            if share is not None:
                scores[t].append(share)
                kind["scores"][t].append(share)
                if not t and _names_absent_object(scene, rec["questions"][i]):
                    absent_scores.append(share)
    n = hits[True][1] + hits[False][1]
    acc_t = hits[True][0] / hits[True][1] if hits[True][1] else float("nan")
    acc_f = hits[False][0] / hits[False][1] if hits[False][1] else float("nan")
    by_kind = {}
    for k, d in kinds.items():
        m = d["hits"][True][1] + d["hits"][False][1]
        if m:
            by_kind[k] = {
                "claims": m,
                "share_false": d["hits"][False][1] / m,
                "accuracy": (d["hits"][True][0] + d["hits"][False][0]) / m,
                "auc": roc_auc(d["scores"][True], d["scores"][False]),
            }
    return {
        "accuracy": (hits[True][0] + hits[False][0]) / n if n else float("nan"),
        "accuracy_true_claims": acc_t,
        "accuracy_false_claims": acc_f,
        "balanced_accuracy": (acc_t + acc_f) / 2,
        "claims": n,
        "false_claims": hits[False][1],
        "unreadable_questions": unreadable,
        "auc": roc_auc(scores[True], scores[False]),
        "by_kind": by_kind,
        "absent_object_auc": roc_auc(scores[True], absent_scores),
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
