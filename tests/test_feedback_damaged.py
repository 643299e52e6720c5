"""Hand-damaged intermediate records go to the errors file naming the record and field; empty inputs are loud."""

from __future__ import annotations

import json

import pytest

from muffin.feedback.autocheck import AutocheckConfig, run_autocheck
from muffin.feedback.changeq import ChangeqConfig, run_changeq
from muffin.feedback.divide import DivideConfig, run_divide
from muffin.feedback.pairs import build_pairs
from muffin.feedback.records import load_prompts
from muffin.feedback.stage import read_errors


def _answer(aid: str, **kw) -> dict:
    return {"answer_id": aid, "prompt_id": aid.split("#")[0], "question": "Describe.", "error": None, **kw}


def test_divide_and_changeq_send_damaged_records_to_the_errors_file(tmp_path) -> None:
    """p#0 lost its 'answer' (the issue's KeyError), p#1 has a number for it, p#2 is intact; in changeq's input
    q#0 has 'claims: null' (the issue's TypeError)."""
    answers = [_answer("p#0"), _answer("p#1", answer=5), _answer("p#2", answer="A red ball. A dog.")]
    out = run_divide(answers, tmp_path / "claims.jsonl", DivideConfig(), progress=False)
    assert [r["answer_id"] for r in out] == ["p#0", "p#1", "p#2"]
    assert out[2]["claims"] == ["A red ball.", "A dog."] and out[2]["error"] is None
    errs = {e["id"]: e for e in read_errors(tmp_path / "claims.jsonl")}
    assert set(errs) == {"p#0", "p#1"}
    assert errs["p#0"]["stage"] == "divide"
    assert "record 'p#0': field 'answer' is missing; it is written by generate" in errs["p#0"]["reason"]
    assert "field 'answer' is int, not a string" in errs["p#1"]["reason"]
    assert out[0]["error"]["stage"] == "divide"

    claims = [_answer("q#0", answer="x", claims=None), _answer("q#1", answer="x", claims=["The ball is red."])]
    got = run_changeq(claims, tmp_path / "questions.jsonl", ChangeqConfig(), progress=False)
    assert got[1]["questions"] == ["Is the ball red?"]
    (err,) = read_errors(tmp_path / "questions.jsonl")
    assert err["id"] == "q#0" and "field 'claims' is null, not a list of strings" in err["reason"]
    assert "written by divide" in err["reason"]


def test_autocheck_damaged_questions_fail_without_a_model_call(tmp_path) -> None:
    """Every record is damaged, so the labeler is never called (None stands in for it: any call would raise)."""
    recs = [_answer("a#0", answer="x", claims=["c"], questions=None), _answer("a#1", answer="x", claims=["c"])]
    out = run_autocheck(None, recs, [], tmp_path / "checked.jsonl", AutocheckConfig(batch_size=4), progress=False)
    assert [r["error"]["stage"] for r in out] == ["autocheck", "autocheck"]
    reasons = {e["id"]: e["reason"] for e in read_errors(tmp_path / "checked.jsonl")}
    assert "field 'questions' is null" in reasons["a#0"] and "field 'questions' is missing" in reasons["a#1"]


def test_pairs_name_a_record_without_score() -> None:
    good = [
        {**_answer(f"p#{k}", answer=f"a{k}"), "verdicts": [True] * (k + 1) + [False] * k, "score": -k}
        for k in range(3)
    ]
    broken = {**_answer("p#3", answer="a3"), "verdicts": [True]}  # no 'score'
    errors: list[dict] = []
    pairs, stats = build_pairs([*good, broken], max_pairs=5, errors=errors)
    assert stats["answers_malformed"] == 1 and len(pairs) == 3  # the three intact answers: scores 0, -1, -2
    assert errors == [
        {
            "id": "p#3",
            "stage": "pairs",
            "reason": "record 'p#3': field 'score' is missing; it is written by autocheck: rerun it or restore "
            "the record",
        }
    ]


def test_a_record_without_its_key_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="record 2 has no 'answer_id'"):
        run_divide([_answer("p#0", answer="x"), {"answer": "y"}], tmp_path / "c.jsonl", DivideConfig(), progress=False)


def test_empty_or_all_invalid_prompt_file_is_an_error(tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no valid prompt .0 invalid records. .the file is empty."):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"ds_question_id": "x", "image_path": "nope.png"}) + "\n")
    with pytest.raises(ValueError, match="holds no valid prompt .1 invalid records.; the first problem: line 1"):
        load_prompts(tmp_path / "bad.jsonl")
