"""The world's hallucination sources (colour confusion, miscount, mirrored place) drawn at their rates, the rule
splitter's count claims, the instance / count / colour / place metrics and the oracle on those claim kinds."""

from __future__ import annotations

import math
import random

import pytest

from muffin.feedback.rules import claim_to_question_rule, merge_counts, split_claims_rule
from muffin.world.captions import COLOUR_CONFUSIONS, CaptionConfig, draw_description, groups_of, mirror_cell
from muffin.world.metrics import SELECTION, answer_checks, pair_signal, world_metrics
from muffin.world.oracle import claim_kind
from muffin.world.questions import oracle_truth, parse_mentions
from muffin.world.scenes import Scene, WorldConfig, WorldObject, make_scene
from muffin.world.shapes import CELL_NAMES

OFF = {"hallucination_rate": 0.0, "colour_confusion_rate": 0.0, "miscount_rate": 0.0, "place_error_rate": 0.0}


def _within(errors: int, chances: int, rate: float) -> bool:
    """The drawn share of errors is a binomial(chances, rate) count over chances: its sd is sqrt(rate (1 - rate) /
    chances); 4 sd leaves a 6e-5 chance of a false failure (the seeds are fixed, so the test is deterministic)."""
    return abs(errors / chances - rate) <= 4 * math.sqrt(rate * (1 - rate) / chances)


def _descriptions(rates: dict[str, float], n: int = 1500, seed: int = 0):
    cfg = CaptionConfig(**{**OFF, **rates}, synonym_rate=0.0, max_places=2)
    world = WorldConfig(p_repeat=0.3)
    rng = random.Random(seed)
    for i in range(n):
        sc = make_scene(world, "sft", i)
        yield sc, draw_description(sc, rng, cfg)


def test_mirror_cell_by_hand():
    # 3 x 3 grid, row-major: left and right swap; the middle column's top and bottom swap; the centre stays
    assert [mirror_cell(c) for c in range(9)] == [2, 7, 0, 5, 4, 3, 8, 1, 6]


def test_colour_confusions_are_drawn_at_their_rate_and_only_there():
    """Each listed group (in the scene's reading order, the partner source off) is read back from the text: an
    orange or purple group is a chance, an error when named red or blue; no other group changes colour."""
    rate, chances, errors = 0.3, 0, 0
    for sc, d in _descriptions({"colour_confusion_rate": rate}):
        said = parse_mentions(d.text.split(". ")[0])
        for g, (_, colour, cls, _) in zip(groups_of(sc), said, strict=True):
            assert cls == g.cls
            if g.colour in COLOUR_CONFUSIONS:
                chances += 1
                errors += colour == COLOUR_CONFUSIONS[g.colour]
                assert colour in (g.colour, COLOUR_CONFUSIONS[g.colour])
            else:
                assert colour == g.colour
    assert chances > 1000 and _within(errors, chances, rate)


def test_miscounts_are_drawn_at_their_rate_on_groups_of_two_or_more():
    rate, chances, errors = 0.6, 0, 0
    for sc, d in _descriptions({"miscount_rate": rate}):
        for g, (count, _, _, _) in zip(groups_of(sc), parse_mentions(d.text.split(". ")[0]), strict=True):
            if len(g.cells) >= 2:
                chances += 1
                errors += count == len(g.cells) + 1
                assert count in (len(g.cells), len(g.cells) + 1)
            else:
                assert count == 1
    assert chances > 300 and _within(errors, chances, rate)


def test_place_errors_are_drawn_at_their_rate_and_name_the_mirror_cell():
    rate, chances, errors = 0.4, 0, 0
    for sc, d in _descriptions({"place_error_rate": rate}):
        for _, colour, cls, where in parse_mentions(" ".join(d.text.split(". ")[1:])):
            (obj,) = [o for o in sc.objects if (o.cls, o.colour) == (cls, colour)]  # places name single groups
            said = CELL_NAMES.index(where)
            if obj.cell == 4:
                assert said == 4
                continue
            chances += 1
            errors += said == mirror_cell(obj.cell)
            assert said in (obj.cell, mirror_cell(obj.cell))
    assert chances > 1000 and _within(errors, chances, rate)


def test_description_records_the_errors_it_drew():
    for _, d in _descriptions({"colour_confusion_rate": 1.0, "miscount_rate": 1.0, "place_error_rate": 1.0}, n=200):
        assert d.errors["colour"] == d.chances["colour"]
        assert d.errors["count"] == d.chances["count"]
        assert d.errors["position"] == d.chances["position"]
    for _, d in _descriptions({}, n=200):
        assert not any(d.errors.values())


# ---------------------------------------------------------------------------------------------- the splitter
@pytest.mark.parametrize(
    "answer, claims",
    [
        (
            "The image shows a yellow ring, a blue heart and a blue heart.",
            ["The image shows a yellow ring.", "The image shows two blue hearts."],
        ),
        (
            "I can see a red star and two red stars. There is a red star at the bottom.",
            ["I can see three red stars.", "There is a red star at the bottom."],
        ),
        ("There is a man. There is a man.", ["There are two men."]),
        ("The image shows a red cross and a red cross.", ["The image shows two red crosses."]),
        (  # each object asserted once: unchanged
            "The image shows a red circle and two blue squares. The red circle is on the left.",
            ["The image shows a red circle.", "The image shows two blue squares.", "The red circle is on the left."],
        ),
    ],
)
def test_splitter_keeps_every_asserted_instance_as_a_count_claim(answer, claims):
    assert split_claims_rule(answer) == claims


def test_merge_counts_leaves_other_claims_in_place():
    claims = ["The dog is brown.", "There is a dog.", "The dog is brown.", "There is a dog."]
    assert merge_counts(claims) == ["The dog is brown.", "There are two dogs.", "The dog is brown."]


# ------------------------------------------------------------------------------------------------ the metrics
def _scene() -> Scene:
    objs = [("ring", "yellow", 0), ("star", "orange", 2), ("heart", "blue", 4), ("square", "green", 6)]
    objs.append(("square", "green", 7))
    return Scene("test", 0, 4_000_000, 64, [WorldObject(c, k, cell, [0, 0, 1, 1]) for c, k, cell in objs])


PADDED = "The image shows a yellow ring, a blue heart and a blue heart."
MIXED = (
    "I can see a red star, three green squares, a yellow moon and a purple arrow. There is a red star in the top "
    "left. There is a blue heart in the center."
)


def test_answer_checks_by_hand():
    """PADDED: two groups, three instances of which two exist (one heart), one group with the wrong number.
    MIXED: red star (the star is orange: a colour error, the planted confusion), three green squares (two: an
    overcount), a yellow moon (absent; the star's partner), a purple arrow (absent, no partner of a present class);
    the red star's place is not judged (no red star), the blue heart is in the centre (right)."""
    a = answer_checks(_scene(), PADDED)
    assert (a["groups"], a["instances"], a["true_instances"]) == (2, 3, 2)
    assert (a["counted_groups"], a["right_counts"], a["count"], a["overcounts"]) == (2, 1, 1, 1)
    assert a["partner"] == a["other"] == a["colour"] == a["position"] == a["place_claims"] == 0
    b = answer_checks(_scene(), MIXED)
    assert (b["groups"], b["instances"], b["true_instances"]) == (4, 6, 2)
    assert (b["partner"], b["other"], b["colour"], b["colour_confusions"], b["count"]) == (1, 1, 1, 1, 1)
    assert (b["coloured_groups"], b["counted_groups"], b["right_counts"]) == (2, 1, 0)
    assert (b["place_claims"], b["place_claims_judged"], b["position"]) == (2, 1, 0)


def test_world_metrics_by_hand():
    """Summed over PADDED and MIXED: instances 9, 4 true -> 4/9; counted groups 3, 1 right -> 1/3; partner and
    other 1 of 6 groups each; colour 1 of 4 coloured groups of present classes; position 0 of 1 judged place claim;
    source_error = (1/6 + 1/4 + 2/3 + 0) / 4 = 13/48."""
    scenes = {4_000_000: _scene()}
    answers = [{"image_id": 4_000_000, "answer": a} for a in (PADDED, MIXED)]
    m = world_metrics(answers, scenes)
    assert m["instance_precision"] == pytest.approx(4 / 9)
    assert m["count_accuracy"] == pytest.approx(1 / 3) and m["count_error"] == pytest.approx(2 / 3)
    assert m["partner_rate"] == pytest.approx(1 / 6) and m["other_rate"] == pytest.approx(1 / 6)
    assert m["colour_error"] == pytest.approx(1 / 4) and m["position_error"] == 0.0
    assert m["overcount_error"] == pytest.approx(2 / 3) and m["undercount_error"] == 0.0
    assert m["source_error"] == pytest.approx(13 / 48)
    assert m["per_answer"] == {"partner": 0.5, "other": 0.5, "colour": 0.5, "count": 1.0, "position": 0.0,
                               "place_claims": 1.0}  # fmt: skip
    wrong_place = world_metrics(
        [{"image_id": 4_000_000, "answer": "There is a yellow ring in the top right."}], scenes
    )
    assert wrong_place["position_error"] == 1.0 and wrong_place["instance_precision"] is None
    assert set(SELECTION) <= set(m)


def test_an_undercount_is_an_omission_not_the_count_sources_hallucination():
    """ "a green square" for the scene's two: a wrong count (count accuracy 1/2 with the right yellow ring) but no
    instance that does not exist (precision 1), so the count source's rate, overcounts, stays 0 and source_error
    with it; "three green squares" is the overcount that raises both."""
    scenes = {4_000_000: _scene()}
    under = world_metrics([{"image_id": 4_000_000, "answer": "I can see a yellow ring and a green square."}], scenes)
    assert (under["count_accuracy"], under["count_error"], under["instance_precision"]) == (0.5, 0.5, 1.0)
    assert (under["overcount_error"], under["undercount_error"], under["source_error"]) == (0.0, 0.5, 0.0)
    over = world_metrics(
        [{"image_id": 4_000_000, "answer": "I can see a yellow ring and three green squares."}], scenes
    )
    assert (over["overcount_error"], over["undercount_error"], over["instance_precision"]) == (0.5, 0.0, 0.75)
    assert over["source_error"] == pytest.approx(0.5 / 3)  # partner 0, colour 0, overcount 1/2; no place claim


def test_world_metrics_refuse_answers_about_unknown_images():
    with pytest.raises(KeyError, match="not a scene"):
        world_metrics([{"image_id": 5, "answer": "A red star."}], {4_000_000: _scene()})


# ------------------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize(
    "claim, kind, truth",
    [
        ("The image shows two blue hearts.", "count", False),  # the padded answer's merged claim: one heart
        ("The image shows two green squares.", "count", True),
        ("I can see three green squares.", "count", False),  # the miscount source
        ("There is a red star.", "colour", False),  # the colour confusion source: the star is orange
        ("There is an orange star.", "colour", True),
        ("There is an orange star in the top left.", "place", False),  # the mirrored place: it is top right
        ("There is an orange star in the top right.", "place", True),
        ("There is a yellow moon.", "colour", False),  # the partner source
    ],
)
def test_oracle_judges_the_new_claim_kinds(claim, kind, truth):
    question = claim_to_question_rule(claim)
    assert claim_kind(question) == kind
    assert oracle_truth(_scene(), question) is truth


def test_pair_signal_by_hand():
    """Three pairs about the test scene. 1: chosen "a yellow ring" vs rejected MIXED (a partner, another absent
    class, a colour error, an overcount): fewer of each. 2: chosen "a yellow ring and a green square" (an undercount:
    two squares) vs rejected "a yellow ring and two green squares": the chosen one undercounts, more. 3: the same
    answer twice: neither. Net = (fewer - more) / 3."""
    from muffin.loop_report import pair_signal_table

    ring, right = "I can see a yellow ring.", "I can see a yellow ring and two green squares."
    pairs = [
        {"prompt_id": "p", "chosen": ring, "rejected": MIXED},
        {"prompt_id": "p", "chosen": "I can see a yellow ring and a green square.", "rejected": right},
        {"prompt_id": "p", "chosen": right, "rejected": right},
    ]
    s = pair_signal(pairs, lambda prompt_id: _scene())
    assert s["pairs"] == 3
    got = {k: (t["fewer"], t["more"]) for k, t in s["by_kind"].items()}
    assert got == {"partner": (1, 0), "other": (1, 0), "colour": (1, 0), "overcount": (1, 0),
                   "undercount": (0, 1), "position": (0, 0)}  # fmt: skip
    assert s["by_kind"]["overcount"]["net"] == pytest.approx(1 / 3)
    assert s["by_kind"]["undercount"]["net"] == pytest.approx(-1 / 3)
    lines = pair_signal_table([{"iteration": 1, "pair_signal": s}, {"iteration": 2, "pair_signal": None}])
    assert (
        lines[-1]
        == "| 1 | 3 | +33.3 (33 / 0) | +33.3 (33 / 0) | +33.3 (33 / 0) | +33.3 (33 / 0) | -33.3 (0 / 33) | +0.0 (0 / 0) |"
    )
    assert pair_signal_table([{"iteration": 1}]) == []
