"""Pure cores of the feedback pipeline: seeds, scores, pair selection, the balance search, parsers, rules, records.

Expected numbers are worked out by hand in each test's docstring; no model is loaded.
"""

from __future__ import annotations

import json
import random

import pytest

from muffin.feedback.autocheck import AutocheckConfig, answer_score, expected_score, judge
from muffin.feedback.balance import GRID, balance_pairs, balance_search
from muffin.feedback.changeq import changeq_prompt, parse_questions
from muffin.feedback.divide import parse_facts, split_prompt
from muffin.feedback.generate import sample_seed
from muffin.feedback.pairs import build_pairs, candidate_pairs, sample_pairs
from muffin.feedback.parsers import parse_bullets
from muffin.feedback.records import load_prompts
from muffin.feedback.rules import claim_to_question_rule, split_claims_rule
from muffin.feedback.stage import stable_seed
from utils.chat_lm.prompts import load_prompt

# ------------------------------------------------------------------------------------------------ seeds and scores


def test_seeds_are_stable_and_distinct():
    """SHA-256 of the joined parts: fixed across processes; differs across prompt id and sample index."""
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"generate\x1f0\x1fp1\x1f3").digest()[:8], "big") & (2**63 - 1)
    assert sample_seed(0, "p1", 3) == expected
    seeds = {sample_seed(0, pid, k) for pid in ("p1", "p2") for k in range(10)}
    assert len(seeds) == 20
    assert sample_seed(1, "p1", 3) != sample_seed(0, "p1", 3)
    assert stable_seed("a", 1) != stable_seed("a1")


def test_judge_and_score_by_hand():
    """yes > no -> true; (0.6,0.3) T, (0.2,0.7) F, (0.4,0.4) tie F, (0.51,0.49) T: 2 false -> score -2."""
    verdicts = judge([0.6, 0.2, 0.4, 0.51], [0.3, 0.7, 0.4, 0.49])
    assert verdicts == [True, False, False, True]
    assert answer_score(verdicts) == -2
    assert answer_score([]) == 0


def test_expected_score_by_hand():
    """-(sum of P(no) / (P(yes) + P(no))): (0.6, 0.3) 1/3, (0.2, 0.6) 3/4, (0.4, 0.4) 1/2, (0, 0) counts as false."""
    assert expected_score([0.6, 0.2, 0.4, 0.0], [0.3, 0.6, 0.4, 0.0]) == pytest.approx(-(1 / 3 + 3 / 4 + 1 / 2 + 1))
    assert expected_score([], []) == 0
    # certain read-outs give the paper's count
    p_yes, p_no = [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]
    assert expected_score(p_yes, p_no) == answer_score(judge(p_yes, p_no)) == -1
    with pytest.raises(ValueError, match="unknown answer score 'soft'"):
        AutocheckConfig(score="soft")


# ------------------------------------------------------------------------------------------------------ pairs


def test_candidate_pairs_by_hand():
    """scores [0, -2, 0, -1, -2]: pairs (i<j) with |diff| >= 1, higher score first:
    (0,1) (0,3) (0,4) (2,1) (3,1)? no: -1 > -2 so (3,1); (2,3) (2,4) (3,4); (1,4) and (0,2) tie -> excluded."""
    got = candidate_pairs([0, -2, 0, -1, -2])
    assert got == [(0, 1), (0, 3), (0, 4), (2, 1), (3, 1), (2, 3), (2, 4), (3, 4)]
    assert candidate_pairs([0, -2, 0, -1, -2], min_diff=2) == [(0, 1), (0, 4), (2, 1), (2, 4)]
    assert candidate_pairs([-1, -1, -1]) == []
    # fractional scores (AutocheckConfig.score = "expected") with a fractional gap
    assert candidate_pairs([-0.2, -0.9, -0.5], min_diff=0.5) == [(0, 1)]
    with pytest.raises(ValueError, match="min_diff must be > 0"):
        build_pairs([], min_diff=0)


def test_sample_pairs_uses_seeded_random():
    """With 8 candidates and k=2 the picked indices are sorted(random.Random(seed).sample(range(8), 2))."""
    cands = [(i, i + 1) for i in range(8)]
    idx = sorted(random.Random(123).sample(range(8), 2))
    assert sample_pairs(cands, 2, 123) == [cands[i] for i in idx]
    assert sample_pairs(cands[:2], 2, 5) == cands[:2]


def _checked(pid, scores, claims=None, error_at=()):
    recs = []
    for k, s in enumerate(scores):
        n = (claims or {}).get(k, 1 - s)  # by default one true claim besides the false ones
        rec = {
            "answer_id": f"{pid}#{k}",
            "prompt_id": pid,
            "question": "q",
            "answer": f"answer {pid} {k}",
            "verdicts": [False] * -s + [True] * (n + s),
            "score": s,
            "error": None,
        }
        if k in error_at:
            rec = {**rec, "error": {"stage": "divide", "reason": "unparseable"}}
        recs.append(rec)
    return recs


def test_build_pairs_counts_errors_and_zero_claims():
    """Prompt A scores [0,-1,-3] with answer 2 failed -> usable [0,-1] -> one pair (A#0 > A#1).
    Prompt B scores [0,0] with answer 1 having zero claims (score 0) -> no pair, listed as zero-claim.
    Prompt C [-1,-2,0,-3]: 6 candidates, 2 kept."""
    recs = _checked("A", [0, -1, -3], error_at=(2,)) + _checked("B", [0, 0], claims={0: 2, 1: 0})
    recs += _checked("C", [-1, -2, 0, -3])
    pairs, stats = build_pairs(recs, max_pairs=2, seed=0)
    a = [p for p in pairs if p["prompt_id"] == "A"]
    assert [(p["chosen_id"], p["rejected_id"]) for p in a] == [("A#0", "A#1")]
    assert stats["answers_failed"] == 1 and stats["zero_claim_answers"] == ["B#1"]
    assert stats["prompts_without_pairs"] == 1 and stats["pairs"] == 3
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    again, _ = build_pairs(recs, max_pairs=2, seed=0)
    assert again == pairs


def test_build_pairs_drop_zero_claims():
    """B: answer 0 has 1 false claim (score -1), answer 1 zero claims (score 0): kept -> a pair; dropped -> none."""
    recs = _checked("B", [-1, 0], claims={0: 1, 1: 0})
    assert len(build_pairs(recs)[0]) == 1
    assert build_pairs(recs, drop_zero_claims=True)[0] == []


# ----------------------------------------------------------------------------------------------------- balance


def test_balance_search_by_hand():
    """chosen [10, 2, 10], rejected [10, 10, 8]: shortening 0, 0.8, -0.25.
    r < 0.8 keeps pairs 0 and 2: means 10 vs 9 -> gap 1/9 = 0.111; r >= 0.8 keeps all: 22/3 vs 28/3 -> 2/9.33 = 0.214.
    Best gap at r in [0, 0.78]; ties go to the larger r -> 0.78."""
    res = balance_search([10, 2, 10], [10, 10, 8])
    assert res.r == pytest.approx(0.78)
    assert res.keep == [True, False, True]
    assert res.gap == pytest.approx(1 / 9)
    assert len(res.table) == len(GRID) == 50 and GRID[-1] == 0.98


def test_balance_pairs_drops_identical_first():
    """Pair 1 is identical (dropped); remaining chosen/rejected lengths [3, 1] vs [3, 4]:
    shortening 0 and 0.75; keeping only pair 0 gives gap 0 -> r 0.74 (largest r below 0.75)."""
    pairs = [
        {"chosen": "a b c", "rejected": "d e f"},
        {"chosen": "same text", "rejected": " same text "},
        {"chosen": "x", "rejected": "w x y z"},
    ]
    kept, stats = balance_pairs(pairs)
    assert kept == [pairs[0]]
    assert stats["identical_dropped"] == 1 and stats["dropped_short_chosen"] == 1
    assert stats["r"] == pytest.approx(0.74) and stats["gap_after"] == 0.0


# ----------------------------------------------------------------------------------------------------- parsers

MESSY_FACTS = [
    (
        "Sure! Here are the facts.\n### Facts:\n- The cat is black.\n- There is a red sofa.\n\n"
        "### Question-answer pair:\n- ignored",
        ["The cat is black.", "There is a red sofa."],
    ),
    (
        "**Facts:**\n1. A man rides a horse.\n2) The horse is brown.\n3. **The sky is blue.**",
        ["A man rides a horse.", "The horse is brown.", "The sky is blue."],
    ),
    (
        "### Facts:\n* A bus is parked on the street\n  next to a tree.\n• A woman waits.<|eot_id|>",
        ["A bus is parked on the street next to a tree.", "A woman waits."],
    ),
    ("### Facts:\nThe dog is brown.\nThe dog is sitting.", ["The dog is brown.", "The dog is sitting."]),
    ("### Facts:\n- {Extracted fact 1}\n- ...\n- A clock shows noon.\n- A clock shows noon.", ["A clock shows noon."]),
    ("### Facts:\n", []),
]


@pytest.mark.parametrize("raw,expected", MESSY_FACTS)
def test_parse_facts_messy(raw, expected):
    assert parse_facts(raw) == expected


def test_unparseable_outputs_are_none():
    assert parse_facts("the image a a of sky sky blue </s>") is None
    assert parse_bullets("", "Facts") is None


def test_parse_questions_count_mismatch_is_an_error():
    raw = "### Modified sentences:\n- Is the cat black?\n- Is there a sofa?"
    assert parse_questions(raw, 2) == (["Is the cat black?", "Is there a sofa?"], None)
    items, err = parse_questions(raw, 3)
    assert items == ["Is the cat black?", "Is there a sofa?"] and err.startswith("count mismatch: 3 claims but 2")
    assert parse_questions("garbage", 1)[0] is None


def test_published_templates_fill(reference_dir):
    """split_facts.txt has {question}/{answer}; change_question.txt ends with a descriptive facts slot that is
    replaced by '\\n- fact\\n' per fact."""
    split_t, _ = load_prompt(reference_dir / "prompts" / "split_facts.txt", "")
    text = split_prompt(split_t, "What is it?", "A cat.", max_words=300)
    assert "Question: What is it?\nAnswer: A cat." in text and "{question}" not in text
    long = split_prompt(split_t, "Q", "word " * 500, max_words=300)
    assert len(long.split(" ")) == 300
    cq = changeq_prompt(load_prompt(reference_dir / "prompts" / "change_question.txt", "")[0], ["A.", "B."])
    assert cq.endswith("### Declarative sentences:\n- A.\n\n- B.\n") and "{fact" not in cq


# ------------------------------------------------------------------------------------------------------- rules

SPLITS = [
    (
        "The image shows a red circle and two blue squares. The red circle is on the left. There is a green triangle "
        "in the top right.",
        [
            "The image shows a red circle.",
            "The image shows two blue squares.",
            "The red circle is on the left.",
            "There is a green triangle in the top right.",
        ],
    ),
    (
        "There are two people, a dog, and a bicycle.",
        ["There are two people.", "There is a dog.", "There is a bicycle."],
    ),
    (
        "A cat is sitting between the sofa and the table. It has black and white fur.",
        ["A cat is sitting between the sofa and the table.", "It has black and white fur."],
    ),
    (
        "The sky is blue while the grass is green; a man walks his dog.",
        ["The sky is blue.", "The grass is green.", "A man walks his dog."],
    ),
    ("1. The car stopped at the light.\n2. Dr. Smith waves.", ["The car stopped at the light.", "Dr. Smith waves."]),
    (
        "The red circle and the blue square are above the triangle.",
        ["The red circle is above the triangle.", "The blue square is above the triangle."],
    ),
]


@pytest.mark.parametrize("answer,claims", SPLITS)
def test_split_claims_rule(answer, claims):
    assert split_claims_rule(answer) == claims


QUESTIONS = [
    ("There is a green triangle in the top right.", "Is there a green triangle in the top right in the image?"),
    ("There are two blue squares.", "Are there two blue squares in the image?"),
    ("The red circle is on the left.", "Is the red circle on the left?"),
    ("The man is not wearing a hat.", "Is the man not wearing a hat?"),
    ("The image shows a red circle.", "Does the image show a red circle?"),
    ("The cat has black fur.", "Does the cat have black fur?"),
    ("The car stopped at the light.", "Did the car stop at the light?"),
    ("A woman holds an umbrella.", "Does a woman hold an umbrella?"),
    ("The dog can swim.", "Can the dog swim?"),
    ("There is no person in the picture.", "Is there no person in the picture?"),
    ("Two boats, one of them red.", "Is it true that two boats, one of them red?"),
]


@pytest.mark.parametrize("claim,question", QUESTIONS)
def test_claim_to_question_rule(claim, question):
    assert claim_to_question_rule(claim) == question


# ----------------------------------------------------------------------------------------------------- records


def test_load_prompts_reports_bad_records(tmp_path):
    """Valid: line 1 (path) and line 5 (base64). Errors: no question, missing file, bad base64, duplicate id."""
    from PIL import Image

    from utils.images import image_to_base64

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    lines = [
        {"ds_question_id": "p1", "image_path": "./a.png", "question": "Q1?", "metainfos": {"x": 1}},
        {"ds_question_id": "p2", "image_path": "./a.png"},
        {"ds_question_id": "p3", "image_path": "./missing.png", "question": "Q?"},
        {"ds_question_id": "p4", "image": "not base64!!", "question": "Q?"},
        {"ds_question_id": "p5", "image": image_to_base64(Image.new("RGB", (8, 8))), "question": "Q5?"},
        {"ds_question_id": "p1", "image_path": "./a.png", "question": "again"},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    prompts, errors = load_prompts(path, image_root=tmp_path)
    assert [p.id for p in prompts] == ["p1", "p5"]
    assert prompts[0].load_image().size == (8, 8) and prompts[1].load_image().size == (8, 8)
    reasons = [e["reason"] for e in errors]
    assert "field 'question'" in reasons[0] and "missing.png" in reasons[1] and "base64" in reasons[2]
    assert "duplicate" in reasons[3] and len(errors) == 4
