"""The labeler's score against the world's ground truth: accuracy by hand, and the AUC of its P(yes) read-out."""

from __future__ import annotations

import pytest

from muffin.world.build import build_world
from muffin.world.oracle import WorldTruth, feedback_accuracy, roc_auc


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    build_world(path, splits={"sft": 2, "feedback": 2, "val": 1, "test": 1}, progress=False)
    return WorldTruth(path)


def test_roc_auc_by_hand():
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1], [0.9]) == 0.0
    # 0.5 beats 0.4 (1), ties 0.5 (1/2), loses to 0.6 (0): (1 + 0.5 + 0) / 3
    assert roc_auc([0.5], [0.4, 0.5, 0.6]) == pytest.approx(0.5)
    assert roc_auc([0.7, 0.3], [0.5]) == pytest.approx(0.5)
    assert roc_auc([], [0.5]) is None


def test_feedback_accuracy_by_hand(truth):
    pid = next(p for p in truth.image_of if p.startswith("world_2"))  # a feedback prompt
    scene = truth.scene(pid)
    present = scene.objects[0]
    absent = next(c for c in ("star", "tree", "moon", "heart", "ring") if c not in scene.classes())
    questions = [f"Is there a {present.colour} {present.cls} in the image?", f"Is there a {absent} in the image?"]
    assert truth.truths({"prompt_id": pid, "questions": questions}) == [True, False]
    rec = {
        "prompt_id": pid,
        "questions": questions + ["Is the sky blue?"],  # names no world object: unreadable, not scored
        "verdicts": [True, True, False],  # right on the true claim, wrong on the false one
        "p_yes": [0.9, 0.6, 0.5],
        "p_no": [0.1, 0.4, 0.5],
    }
    acc = feedback_accuracy([rec, {"prompt_id": pid, "error": "generation failed"}], truth)
    assert acc["claims"] == 2 and acc["false_claims"] == 1 and acc["unreadable_questions"] == 1
    assert acc["accuracy"] == 0.5 and acc["accuracy_true_claims"] == 1.0 and acc["accuracy_false_claims"] == 0.0
    assert acc["balanced_accuracy"] == 0.5
    assert acc["auc"] == 1.0  # the read-out ranks the true claim above the false one; the threshold was wrong
    rec["p_yes"], rec["p_no"] = [0.6, 0.9, 0.5], [0.4, 0.1, 0.5]
    assert feedback_accuracy([rec], truth)["auc"] == 0.0
    del rec["p_yes"]
    assert feedback_accuracy([rec], truth)["auc"] is None


def test_feedback_accuracy_by_claim_kind_and_absent_objects(truth):
    """Claims sorted by what they assert (class alone, colour, count, place); the absent-object AUC compares true
    claims with the false ones that name an object missing from the scene, leaving wrong colours out."""
    from muffin.world.oracle import claim_kind
    from muffin.world.shapes import CELL_NAMES, COLOURS

    assert claim_kind("Is there a star in the image?") == "object"
    assert claim_kind("Is there no moon?") == "object"
    assert claim_kind("Does the image show a red star?") == "colour"
    assert claim_kind("Are there two red stars in the image?") == "count"
    assert claim_kind("Is there a red star in the top left in the image?") == "place"
    pid = next(p for p in truth.image_of if p.startswith("world_2"))
    scene = truth.scene(pid)
    obj = scene.objects[0]
    absent = next(c for c in ("star", "tree", "moon", "heart", "ring") if c not in scene.classes())
    wrong_colour = next(c for c in COLOURS if all(o.colour != c for o in scene.objects if o.cls == obj.cls))
    empty_cell = next(i for i in range(len(CELL_NAMES)) if all(o.cell != i for o in scene.objects))
    questions = [
        f"Is there a {obj.cls} in the image?",  # object, true
        f"Is there a {absent} in the image?",  # object, false: absent object
        f"Does the image show a {wrong_colour} {obj.cls}?",  # colour, false: wrong colour, object present
        f"Is there a {obj.colour} {obj.cls} in the {CELL_NAMES[empty_cell]} in the image?",  # place, false
    ]
    assert truth.truths({"prompt_id": pid, "questions": questions}) == [True, False, False, False]
    rec = {
        "prompt_id": pid,
        "questions": questions,
        "verdicts": [True, False, True, True],
        "p_yes": [0.7, 0.2, 0.9, 0.6],
        "p_no": [0.3, 0.8, 0.1, 0.4],
    }
    acc = feedback_accuracy([rec], truth)
    kinds = acc["by_kind"]
    assert set(kinds) == {"object", "colour", "place"}
    assert kinds["object"] == {"claims": 2, "share_false": 0.5, "accuracy": 1.0, "auc": 1.0}
    assert kinds["colour"]["claims"] == 1 and kinds["colour"]["accuracy"] == 0.0 and kinds["colour"]["auc"] is None
    assert kinds["place"]["share_false"] == 1.0
    assert acc["absent_object_auc"] == 1.0  # only the absent star counts: the wrong colour scored above the truth
    assert acc["auc"] == pytest.approx(2 / 3)  # 0.7 beats 0.2 and 0.6, not the wrong colour at 0.9
    assert acc["kind_auc"] == 1.0  # the object kind is the only one with both sides


def test_claims_summary_tells_a_kind_prior_from_checking_claims():
    """A read-out that says "no" to every place claim and "yes" to every colour claim, knowing nothing else, scores a
    high accuracy and overall AUC (place claims are mostly false, colour claims mostly true) but 0.5 within each
    kind; the within-kind AUC weights each kind by its claims."""
    from muffin.world.oracle import claims_summary

    def rows(kind, n_true, n_false, share, absent=False):
        return [
            {"kind": kind, "truth": t, "said_yes": share > 0.5, "share": share, "absent": absent and not t}
            for t in [True] * n_true + [False] * n_false
        ]

    prior = rows("place", 1, 9, 0.2) + rows("colour", 9, 1, 0.8, absent=True)
    s = claims_summary(prior)
    assert s["accuracy"] == 0.9 and s["claims"] == 20 and s["false_claims"] == 10
    assert s["by_kind"]["place"] == {"claims": 10, "share_false": 0.9, "accuracy": 0.9, "auc": 0.5}
    # true claims (1 place at 0.2, 9 colour at 0.8) vs false (9 place at 0.2, 1 colour at 0.8): 81 wins, 18 ties
    assert s["auc"] == pytest.approx((81 + 0.5 * 18) / 100)
    assert s["kind_auc"] == 0.5
    assert s["absent_object_auc"] == pytest.approx((0.5 * 9 + 0) / 10)  # the absent colour claim ties the true ones
    # a read-out that checks colour claims: within-kind AUC (10 * 0.5 + 10 * 1.0) / 20
    checking = rows("place", 1, 9, 0.2) + rows("colour", 9, 0, 0.9) + rows("colour", 0, 1, 0.1, absent=True)
    s = claims_summary(checking)
    assert s["kind_auc"] == 0.75 and s["absent_object_auc"] == 1.0
    assert claims_summary([])["kind_auc"] is None and claims_summary([])["claims"] == 0


def test_hallucination_sources_by_hand(truth):
    """Hallucinated mentions split into the co-occurrence partner the training descriptions add and the others;
    a mention in a place sentence counted again there; answers about unknown images raise."""
    from muffin.world.oracle import hallucination_sources
    from muffin.world.shapes import CLASSES, PARTNER, place_phrase

    scene = next(s for s in truth.scenes.values() if any(PARTNER[c] not in s.classes() for c in s.classes()))
    present = scene.objects[0]
    partner = next(PARTNER[c] for c in sorted(scene.classes()) if PARTNER[c] not in scene.classes())
    other = next(c for c in CLASSES if c not in scene.classes() and c not in {PARTNER[p] for p in scene.classes()})
    answer = (
        f"The image shows a {present.colour} {present.cls} and a red {partner}. "
        f"There is a blue {other} {place_phrase(0)}."
    )
    got = hallucination_sources(
        [{"image_id": scene.image_id, "answer": answer}, {"image_id": scene.image_id, "answer": None}],
        truth.scenes,
    )
    assert got == {"answers": 1, "mentions": 3, "hallucinated": 2, "partner": 1, "other": 1, "in_place_sentence": 1}
    with pytest.raises(KeyError, match="image 12345"):
        hallucination_sources([{"image_id": 12345, "answer": answer}], truth.scenes)
