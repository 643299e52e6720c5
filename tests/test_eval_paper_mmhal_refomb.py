"""MMHal-Bench and RefoMB scored as the published scripts score them (``--protocol paper``); numbers by hand.

MMHal: eval_gpt_mmhal.py / summarize_gpt_mmhal_review.py (a rating only when exactly one distinct lower-cased
"rating: k" is in the reply, else 0; per-type rows by item index mod 8). RefoMB: eval_RefoMB_p0.py,
eval_hallucination.py and json_to_excel.py (the first [[A]]/[[B]]/[[C]], asked again when none).
"""

from __future__ import annotations

import pytest

from eval import mmhal
from eval.judges import JudgeRequest, JudgeResponse, JudgeStats
from eval.parsers import parse_choice_paper, parse_rating_paper, rating_found_paper
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


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ('If Model A is better, output "[[A]]"; ... Final verdict: [[B]]', "A"),  # the first match, even a quote
        ("Model B is better. [[B]]", "B"),
        ("[[C]] and later [[A]]", "C"),
        ("[[b]]", None),  # exact case only
        ("[[Model B]]", None),
        ("[[ B ]]", None),
        ("B is better", None),
    ],
)
def test_published_refomb_verdict_rule(text, want):
    assert parse_choice_paper(text) == want


def test_refomb_paper_layout_reasks_and_table(reference_dir, tmp_path):
    """Pairwise pass with the published instructions: system message "You are a helpful and precise assistant
    for checking the quality of the answer.", the instructions in the user message (four-space indented blocks),
    temperature 1e-5, 2048 tokens; "<|endoftext|>" in the model's answer becomes "<EOT>". Item 1's first reply
    has only "[[b]]" and is asked again. Verdicts: item 0 [[B]] (win, OCR), item 1 [[A]] (loss, OCR), item 2 [[C]]
    (tie, Creative generation): score (1 + 0 + 0.5)/3 = 0.5; OCR "1/1/0", Creative generation "0/0/1".
    Hallucination pass: system "You are a helpful and precise assistant.", temperature 0, the review in the
    user message; verdicts B, B, A -> (1 + 1 + 0)/3 = 2/3."""
    from eval import refomb

    instructions = (reference_dir / "prompts" / "refomb_pairwise_system.txt").read_text()
    hall_instructions = (reference_dir / "prompts" / "refomb_hallucination_system.txt").read_text()
    types = ["OCR", "OCR", "Creative generation"]
    items = [
        {"id": i, "question": f"q{i}", "description": f"d{i}", "type": t, "reference": f"ref{i}", "image_url": "u"}
        for i, t in enumerate(types)
    ]
    items = refomb.attach_answers(items, [{"id": i, "answer": f"ans{i}<|endoftext|>"} for i in range(3)])
    verdicts = {"ans0": "[[B]]", "ans1": "[[A]]", "ans2": "[[C]]"}

    def reply(r: JudgeRequest) -> str:
        user = r.messages[-1][1]
        if "[Beginning of the review text]" in user:
            return {"ans0": "[[B]]", "ans1": "[[B]]", "ans2": "[[A]]"}[next(k for k in verdicts if k in user)]
        key = next(k for k in verdicts if k in user)
        return "[[b]] maybe" if key == "ans1" and r.attempt == 0 else f"review of {key}: {verdicts[key]}"

    judge = FunctionJudge(reply)
    recs = refomb.score_overall(items, judge, SampleStore(tmp_path / "o.jsonl"), system=instructions, reasks=3)
    assert len(judge.seen) == 4 and [r["choice"] for r in recs] == ["B", "A", "C"]
    first = judge.seen[0]
    assert first.messages[0] == (
        "system",
        "You are a helpful and precise assistant for checking the quality of the answer.",
    )
    want_user = (
        f"\n    {instructions}\n\n    [Beginning of the detailed description of the picture]\n    d0\n"
        "    [End of the detailed description of the picture]\n\n    [Beginning of the user's question]\n    q0\n"
        "    [End of the user's question]\n\n    [Beginning of Model A's answer]\n    ref0\n"
        "    [End of Model A's answer]\n\n    [Beginning of Model B's answer]\n    ans0<EOT>\n"
        "    [End of Model B's answer]\n    "
    )
    assert first.messages[1] == ("user", want_user) and (first.temperature, first.max_tokens) == (1e-5, 2048)
    m = refomb.summarize_paper(recs)
    run = m["runs"][0]
    assert m["score"] == pytest.approx(0.5) and (run["wins"], run["losses"], run["ties"]) == (1, 1, 1)
    assert run["categories"]["OCR"] == "1/1/0" and run["categories"]["Creative generation"] == "0/0/1"
    assert list(run["categories"])[:2] == ["Coarse Perception", "Fine-grained perception"]

    hjudge = FunctionJudge(reply)
    hrecs = refomb.score_hallucination(recs, hjudge, SampleStore(tmp_path / "h.jsonl"), system=hall_instructions)
    h = hjudge.seen[0]
    assert h.messages[0] == ("system", "You are a helpful and precise assistant.") and h.temperature == 0.0
    review = recs[0]["review"]
    want = f"\n    {hall_instructions}\n\n    [Beginning of the review text]\n    {review}\n    [End of the review text]\n\n    "
    assert h.messages[1] == ("user", want)
    assert refomb.summarize_paper(hrecs)["score"] == pytest.approx(2 / 3)
