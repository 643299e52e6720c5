"""MMHal-Bench and RefoMB scored as the published scripts score them (``--protocol paper``); numbers by hand.

MMHal: eval_gpt_mmhal.py / summarize_gpt_mmhal_review.py (a rating only when exactly one distinct lower-cased
"rating: k" is in the reply, else 0; per-type rows by item index mod 8). RefoMB: eval_RefoMB_p0.py,
eval_hallucination.py and json_to_excel.py (the first [[A]]/[[B]]/[[C]], asked again when none).
"""

from __future__ import annotations

import pytest

from eval import mmhal
from eval.judges import JudgeResponse, JudgeStats
from eval.parsers import parse_rating_paper, rating_found_paper
from eval.scoring import SampleStore


class FunctionJudge:
    """A Judge (the protocol) whose answer is ``reply(request)``; keeps the requests it saw."""

    def __init__(self, reply) -> None:
        self.id, self.stats, self.reply, self.seen = "function", JudgeStats(), reply, []

    def complete(self, requests, *, progress=False):
        self.seen += requests
        return [JudgeResponse(self.reply(r)) for r in requests]


@pytest.mark.parametrize(
    ("text", "want", "found"),
    [
        ("The answer is fine. Rating: 3/10", 3, True),  # substring "rating: 3"
        ("Rating: 10", 1, True),  # substring "rating: 1"
        ("Rating: 45", 4, True),
        ("RATING: 2", 2, True),
        ("rating: 4. To conclude, Rating: 4", 4, True),  # one distinct value
        ("- Rating: 6, very informative\n- Rating: 5, very informative", 0, False),  # two values
        ("**Rating:** 5", 0, False),
        ("Rating:5", 0, False),
        ("Rating: 7", 0, False),
        ("", 0, False),
    ],
)
def test_published_mmhal_rating_rule(text, want, found):
    assert parse_rating_paper(text) == want and rating_found_paper(text) is found


TYPES = ["attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other"]
RATINGS = [6, 5, 4, 3, 2, 1, 0, 3, 0, 5, 6, 3, 2, 2, 1, 4]


def test_mmhal_paper_summary_by_hand():
    """16 items cycling through the 8 types. Sum 24 + 23 = 47 -> 2.9375; below 3: 2,1,0 and 0,2,2,1 -> 7/16;
    informativeness (k-3 if k >= 3 else k): 3+2+1+0+2+1+0+0 + 0+2+3+0+2+2+1+1 = 20 -> 20/16/3*100 = 41.67;
    per type (index mod 8): (6+0)/2, (5+5)/2, (4+6)/2, (3+3)/2, (2+2)/2, (1+2)/2, (0+1)/2, (3+4)/2."""
    recs = [{"id": i, "question_type": TYPES[i % 8], "rating": k} for i, k in enumerate(RATINGS)]
    recs.append({"id": 16, "question_type": TYPES[0], "rating": None, "error": "no answer for item 16"})
    m = mmhal.summarize_paper(recs)
    assert (m["average_score"], m["hallucination_rate"]) == pytest.approx((47 / 16, 7 / 16))
    assert m["informativeness"] == pytest.approx(125 / 3)
    assert list(m["average_score_by_type"]) == TYPES
    assert list(m["average_score_by_type"].values()) == [3.0, 5.0, 5.0, 3.0, 2.0, 1.5, 0.5, 3.5]
    assert (m["n_scored"], m["n_unscored"]) == (16, 1)
    text = mmhal.format_paper_summary(m)
    assert "Informativeness: 41.67\nAverage score: 2.94\nHallucination rate: 0.44\n" in text
    assert "Average score for each question type: 3.0,5.0,5.0,3.0,2.0,1.5,0.5,3.5" in text


def test_mmhal_paper_scoring_requests_and_no_reask(reference_dir, tmp_path):
    """With the published prompt: one user message, temperature 0, 512 tokens, the four {} slots filled as
    template.format(contents, question, gt, answer). A reply with two ratings is 0 and is not asked again."""
    template = (reference_dir / "prompts" / "mmhal_judge.txt").read_text()
    items = [
        {"id": i, "question_type": TYPES[i], "image_content": ["Dog", "Cat"], "question": f"q{i}", "gt_answer": "g"}
        for i in range(3)
    ]
    items = mmhal.attach_answers(items, [{"id": i, "answer": f"ans{i}"} for i in range(3)])
    replies = {"ans0": "Good. Rating: 5", "ans1": "Rating: 6 or maybe Rating: 2", "ans2": "Rating: 10"}
    judge = FunctionJudge(lambda r: next(v for k, v in replies.items() if k in r.messages[-1][1]))
    recs = mmhal.score_mmhal(
        items, judge, SampleStore(tmp_path / "s.jsonl"), template=template, max_tokens=512, progress=False
    )
    assert [r["rating"] for r in recs] == [5, 0, 1] and [r["rating_found"] for r in recs] == [True, False, True]
    assert len(judge.seen) == 3
    req = judge.seen[0]
    assert [role for role, _ in req.messages] == ["user"] and (req.temperature, req.max_tokens) == (0.0, 512)
    assert req.messages[0][1] == template.format("Dog, Cat", "q0", "g", "ans0")
    m = mmhal.summarize_paper(recs)
    assert m["average_score"] == 2.0 and m["n_rating_not_found"] == 1
