"""MMHal-Bench and RefoMB summaries on canned judge outputs, numbers computed by hand; resume of failed samples."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable

import pytest

from eval import mmhal, refomb
from eval.judges import JudgeRequest, JudgeResponse, JudgeStats
from eval.scoring import SampleStore


class FunctionJudge:
    """A Judge (the protocol) whose answer is ``reply(request)``; counts the requests it saw."""

    def __init__(self, reply: Callable[[JudgeRequest], JudgeResponse | str]) -> None:
        self.id, self.stats, self.reply, self.seen = "function", JudgeStats(), reply, []

    def complete(self, requests, *, progress=False):
        out = []
        for r in requests:
            self.seen.append(r)
            resp = self.reply(r)
            out.append(resp if isinstance(resp, JudgeResponse) else JudgeResponse(resp))
        return out


def test_mmhal_summary_by_hand():
    """Ratings: type a: 6, 2; type b: 3, 0, unparseable; type c: no answer.
    exclude: score (6+2+3+0)/4 = 2.75, hallucination (2 and 0 are < 3) 2/4; a: 4.0 / 0.5, b: 1.5 / 0.5.
    zero (published): the unparseable one counts 0 -> 11/5 = 2.2, hallucination 3/5; the missing one never counts."""
    recs = [
        {"id": 0, "question_type": "a", "rating": 6},
        {"id": 1, "question_type": "a", "rating": 2},
        {"id": 2, "question_type": "b", "rating": 3},
        {"id": 3, "question_type": "b", "rating": 0},
        {"id": 4, "question_type": "b", "rating": None, "error": "unparseable rating after 3 attempts"},
        {"id": 5, "question_type": "c", "rating": None, "error": "no answer for item 5 in the answers file"},
    ]
    s = mmhal.summarize(recs)
    assert (s["lenient_score"], s["lenient_hallucination_rate"], s["n_rated"], s["n_unrated"]) == (2.75, 0.5, 4, 2)
    assert s["lenient_score_by_type"] == {"a": 4.0, "b": 1.5}
    assert s["lenient_hallucination_rate_by_type"] == {"a": 0.5, "b": 0.5}
    z = mmhal.summarize(recs, unparsed="zero")
    assert (z["lenient_score"], z["lenient_hallucination_rate"], z["n_rated"]) == (
        pytest.approx(2.2),
        pytest.approx(0.6),
        5,
    )
    with pytest.raises(ValueError, match="exclude"):
        mmhal.summarize(recs, unparsed="drop")


def test_mmhal_reference_template_and_answer_formats(reference_dir):
    path = reference_dir / "data" / "rlaifv-original" / "eval" / "mmhal-bench_answer_template.json"
    items = mmhal.load_mmhal_items(path)
    assert len(items) == 96 and {i["id"] for i in items} == set(range(96))
    assert all(n == 12 for n in Counter(i["question_type"] for i in items).values())
    filled = json.loads(path.read_text())
    for i, rec in enumerate(filled):
        rec["model_answer"] = f"answer {i}" if i != 5 else ""
    with_answers = mmhal.attach_answers(items, filled)
    assert with_answers[3]["answer"] == "answer 3" and "no answer for item 5" in with_answers[5]["error"]
    jsonl = mmhal.attach_answers(items, [{"id": 0, "answer": "x"}, {"answer": "no id"}])
    assert jsonl[0]["answer"] == "x" and sum("error" in r for r in jsonl) == 95


def test_mmhal_retryable_failures_are_redone_on_rerun(tmp_path):
    """First run: item 1's judge call fails past its retries (retryable). Rerun: only item 1 is asked."""
    items = [
        {
            "id": i,
            "question_type": "t",
            "image_content": ["Cat"],
            "question": f"q{i}",
            "gt_answer": "g",
            "answer": f"ans{i}",
        }
        for i in range(3)
    ]

    def flaky(r: JudgeRequest) -> JudgeResponse | str:
        return JudgeResponse(None, error="HTTP 429", retryable=True) if "ans1" in r.messages[-1][1] else "Rating: 4"

    store = SampleStore(tmp_path / "s.jsonl")
    recs = mmhal.score_mmhal(items, FunctionJudge(flaky), store, progress=False, protocol="ours")
    store.close()
    assert [r["rating"] for r in recs] == [4, None, 4] and recs[1]["retryable"]
    judge = FunctionJudge(lambda r: "Rating: 6")
    store = SampleStore(tmp_path / "s.jsonl")
    recs = mmhal.score_mmhal(items, judge, store, progress=False, protocol="ours")
    assert len(judge.seen) == 1 and "ans1" in judge.seen[0].messages[-1][1]
    assert [r["rating"] for r in recs] == [4, 6, 4]


VERDICTS = {  # (run, item) -> pairwise verdict; item 3 has no answer
    (0, 0): "[[B]]",
    (0, 1): "[[A]]",
    (0, 2): "[[C]]",
    (1, 0): "[[B]]",
    (1, 1): "[[C]]",
    (1, 2): "[[B]]",
}
HALL = {(0, 0): "[[C]]", (0, 1): "[[A]]", (0, 2): "[[B]]", (1, 0): "[[B]]", (1, 1): "[[B]]", (1, 2): "[[B]]"}


def pairwise(r: JudgeRequest) -> str:
    run, user = r.attempt // refomb.RUN_STRIDE, r.messages[-1][1]
    if "[Beginning of the review text]" in user:  # hallucination pass: find which review this is
        key = next(k for k in HALL if f"REVIEW {k}" in user)
        return f"Counting hallucinations... {HALL[key]}"
    item = next(i for i in range(3) if f"model answer {i}" in user)
    if (run, item) == (1, 2) and r.attempt % refomb.RUN_STRIDE == 0:
        return "I think both have merits."  # no verdict: re-asked
    return f"REVIEW {(run, item)} ... Final: {VERDICTS[(run, item)]}"


def test_refomb_overall_and_hallucination_passes(tmp_path):
    """Overall, per run: run 0 = (1 + 0 + 0.5)/3 = 0.5 (T1 (1+0)/2 = 0.5, T2 0.5); run 1 = (1 + 0.5 + 1)/3 = 5/6
    (T1 0.75, T2 1.0). Mean 2/3, sample std |5/6 - 1/2| / sqrt(2); T1 0.625, T2 0.75. Item 3 (no answer) is
    unscored in both runs. Hallucination pass: run 0 = (0.5 + 0 + 1)/3 = 0.5, run 1 = 1.0, mean 0.75."""
    items = [
        {"id": i, "question": f"q{i}", "description": "d", "type": t, "answer": f"ref {i}", "image_url": f"u{i}"}
        for i, t in enumerate(["T1", "T1", "T2", "T2"])
    ]
    items = [{**it, "reference": it["answer"]} for it in items]
    items = refomb.attach_answers(items, [{"id": i, "answer": f"model answer {i}"} for i in range(3)])
    judge = FunctionJudge(pairwise)
    store = SampleStore(tmp_path / "overall.jsonl")
    recs = refomb.score_overall(items, judge, store, runs=2, protocol="ours")
    store.close()
    assert len(recs) == 8 and recs[3]["error"].startswith("no answer") and recs[3]["run"] == 0
    assert len(judge.seen) == 7  # 6 answered (item, run) pairs + 1 re-ask
    s = refomb.summarize(recs)
    assert s["runs"][0]["score"] == pytest.approx(0.5) and s["runs"][1]["score"] == pytest.approx(5 / 6)
    assert s["lenient_score"] == pytest.approx(2 / 3)
    assert s["lenient_score_std"] == pytest.approx(statistics.stdev([0.5, 5 / 6])) == pytest.approx((1 / 3) / 2**0.5)
    assert s["lenient_score_by_type"] == pytest.approx({"T1": 0.625, "T2": 0.75})
    assert (s["runs"][0]["wins"], s["runs"][0]["losses"], s["runs"][0]["ties"], s["runs"][0]["n_unscored"]) == (
        1,
        1,
        1,
        1,
    )

    hstore = SampleStore(tmp_path / "hall.jsonl")
    hrecs = refomb.score_hallucination(recs, FunctionJudge(pairwise), hstore, protocol="ours")
    h = refomb.summarize(hrecs)
    assert (h["runs"][0]["score"], h["runs"][1]["score"], h["lenient_score"]) == pytest.approx((0.5, 1.0, 0.75))
    assert hrecs[3]["error"].startswith("no review from the overall pass")


def test_refomb_reference_file_loads(reference_dir):
    items = refomb.load_refomb_items(
        reference_dir / "data" / "rlaifv-original" / "eval" / "gpt4v_RefoMB_dev_0521.jsonl"
    )
    assert len(items) == 99 and all(it["reference"] for it in items)
    matched = refomb.attach_answers(
        items, [{"image_url": items[5]["image_url"], "question": items[5]["question"], "answer": "by url"}]
    )
    assert matched[5]["model_answer"] == "by url" and "error" in matched[4]
