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


def is_world(path: str | Path) -> bool:
    """Whether ``path`` is a world directory written by ``muffin.world.build`` (it holds the world's synonym table)."""
    return (Path(path) / "synonyms.txt").is_file()


class WorldTruth:
    """Scenes of a world by prompt id (``ds_question_id`` of the world's prompt files)."""

    def __init__(self, world_dir: str | Path) -> None:
        world = Path(world_dir)
        if not is_world(world):
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


def names_absent_object(scene: Scene, question: str) -> bool:
    """Whether ``question`` names a class with no instance in ``scene`` (the hallucination CHAIR counts)."""
    return any(count_of(scene, cls) == 0 for _, _, cls, _ in parse_mentions(question))


def claim_row(scene: Scene, question: str, truth: bool, said_yes: bool, share: float | None) -> dict[str, Any]:
    """One judged claim as ``claims_summary`` reads it: its kind, truth, verdict, P(yes) share and whether it names
    an absent object."""
    return {
        "kind": claim_kind(question),
        "truth": truth,
        "said_yes": said_yes,
        "share": share,
        "absent": not truth and names_absent_object(scene, question),
    }


def claims_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Verdicts on judged claims (``claim_row``) against the ground truth: accuracy over all claims, on true and on
    false ones, their mean (balanced accuracy), ``auc`` of the P(yes) share for true vs false claims, ``by_kind``
    (claims, share false, accuracy, AUC for each ``claim_kind``), ``kind_auc`` (the per-kind AUCs averaged with
    the kinds' claim counts as weights: how well claims are checked within a kind, which a read-out that only knows
    place claims are mostly false does not raise) and ``absent_object_auc`` (true claims against false claims
    naming an absent object, the error CHAIR counts). An AUC is None when a side is empty."""

    def acc(sub: list[dict[str, Any]]) -> float:
        return sum(r["said_yes"] == r["truth"] for r in sub) / len(sub) if sub else float("nan")

    def auc(sub: list[dict[str, Any]], negatives: list[dict[str, Any]] | None = None) -> float | None:
        pos = [r["share"] for r in sub if r["truth"] and r["share"] is not None]
        neg = [r["share"] for r in (negatives if negatives is not None else sub) if not r["truth"]]
        return roc_auc(pos, [x for x in neg if x is not None])

    rows = list(rows)
    true_rows = [r for r in rows if r["truth"]]
    false_rows = [r for r in rows if not r["truth"]]
    by_kind: dict[str, dict[str, Any]] = {}
    for k in CLAIM_KINDS:
        sub = [r for r in rows if r["kind"] == k]
        if sub:
            by_kind[k] = {
                "claims": len(sub),
                "share_false": sum(not r["truth"] for r in sub) / len(sub),
                "accuracy": acc(sub),
                "auc": auc(sub),
            }
    weighted = [(m["claims"], m["auc"]) for m in by_kind.values() if m["auc"] is not None]
    return {
        "accuracy": acc(rows),
        "accuracy_true_claims": acc(true_rows),
        "accuracy_false_claims": acc(false_rows),
        "balanced_accuracy": (acc(true_rows) + acc(false_rows)) / 2,
        "claims": len(rows),
        "false_claims": len(false_rows),
        "auc": auc(rows),
        "by_kind": by_kind,
        "kind_auc": sum(n * a for n, a in weighted) / sum(n for n, _ in weighted) if weighted else None,
        "absent_object_auc": auc(true_rows, [r for r in false_rows if r["absent"]]),
    }


def feedback_accuracy(checked: Sequence[dict[str, Any]], truth: WorldTruth) -> dict[str, Any]:
    """The labeler's verdicts on claims against the ground truth (records of the conquer stage): ``claims_summary``
    of every judged claim the oracle can read (the P(yes) share from the records' ``p_yes``/``p_no``; AUCs are None
    without them) and ``unreadable_questions``, those it cannot (they mention no object of the world)."""
    rows: list[dict[str, Any]] = []
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
            share = yes_share(p_yes[i], p_no[i]) if i < len(p_yes) and i < len(p_no) else None
            rows.append(claim_row(scene, rec["questions"][i], t, bool(verdict), share))
    return {**claims_summary(rows), "unreadable_questions": unreadable}


def hallucination_sources(answers: Sequence[dict[str, Any]], scenes: dict[int, Scene]) -> dict[str, int]:
    """Where a policy's hallucinated mentions come from, on answers about world scenes (records with ``image_id``
    and ``answer``, as ``eval.answer`` writes them): ``mentions`` (object mentions the world's parser reads),
    ``hallucinated`` (those naming a class absent from the scene), split into ``partner`` (the absent class is the
    usual partner of a present one, ``shapes.PARTNER``: the bias the training descriptions teach) and ``other``
    (confusions and inventions the descriptions never show), and ``in_place_sentence`` (hallucinated mentions in
    a "There is ... in the <place>." sentence). Counted per mention, a repeated one each time (CHAIR-i counts an
    object once per answer, so its totals are smaller); answers about images that are not in ``scenes`` raise."""
    from muffin.world.shapes import PARTNER

    out = {"answers": 0, "mentions": 0, "hallucinated": 0, "partner": 0, "other": 0, "in_place_sentence": 0}
    for rec in answers:
        if rec.get("answer") is None:
            continue
        if rec["image_id"] not in scenes:
            raise KeyError(f"answer about image {rec['image_id']}: not a scene of this world's splits")
        present = scenes[rec["image_id"]].classes()
        partners = {PARTNER[c] for c in present}
        out["answers"] += 1
        for _, _, cls, where in parse_mentions(rec["answer"]):
            out["mentions"] += 1
            if cls in present:
                continue
            out["hallucinated"] += 1
            out["partner" if cls in partners else "other"] += 1
            out["in_place_sentence"] += where is not None
    return out


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
