"""One bad record in a batch fails alone: generate and autocheck write the good records of the batch, and the bad
one goes to the errors file with the reason and the limit it exceeded (issue 32 item 3)."""

from __future__ import annotations

import json

import pytest
from test_feedback_e2e import _prompt_file

from muffin.decoding import CANDIDATE_SAMPLING
from muffin.family import load_family
from muffin.feedback.autocheck import AutocheckConfig, run_autocheck
from muffin.feedback.generate import GenerateConfig, run_generate
from muffin.feedback.records import load_prompts
from muffin.feedback.stage import read_errors
from utils.faults import call_per_record, fault_fields

LONG = "word " * 20000  # the 20,000-word question: 80,000 tokens against the tiny LLaVA's 512


@pytest.fixture(scope="module")
def policy(tiny_llava):
    return load_family(tiny_llava, device="cpu")


def test_call_per_record_by_hand() -> None:
    """10 // x over [5, 0, 2]: the batch raises ZeroDivisionError, which is no record fault: it propagates.
    int(x) over ["3", "x", "4"]: ValueError on "x" alone; 3 and 4 are kept."""
    with pytest.raises(ZeroDivisionError):
        call_per_record(lambda xs: [10 // x for x in xs], [5, 0, 2])
    got = call_per_record(lambda xs: [int(x) for x in xs], ["3", "x", "4"])
    assert [r for r, _ in got] == [3, None, 4]
    assert got[1][1] == {"reason": "ValueError: invalid literal for int() with base 10: 'x'"}
    assert fault_fields(ValueError("the prompt is 900 tokens, over the model's context of 512"))["limit"] == 512


def test_generate_writes_the_batch_around_an_over_long_prompt(policy, tmp_path):
    path = _prompt_file(tmp_path, n=2, bad=False)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[0]["question"] = LONG
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    prompts = load_prompts(path, tmp_path)[0]
    cfg = GenerateConfig(
        num_samples=2, seed=0, batch_size=4, decoding=CANDIDATE_SAMPLING.replace(max_new_tokens=4), policy="tiny"
    )  # one batch of 4 answers
    recs = run_generate(policy, prompts, tmp_path / "answers.jsonl", cfg, progress=False)
    assert [r["answer"] is None for r in recs] == [True, True, False, False]
    assert recs[0]["error"]["limit"] == 512 and "over the model's context of 512" in recs[0]["error"]["reason"]
    errors = {e["id"]: e for e in read_errors(tmp_path / "answers.jsonl")}
    assert set(errors) == {"shape0#0", "shape0#1"} and errors["shape0#0"]["limit"] == 512
    again = run_generate(policy, prompts, tmp_path / "answers.jsonl", cfg, progress=False)  # rerun: no abort
    assert again == recs


def test_autocheck_writes_the_batch_around_an_over_long_question(policy, tmp_path):
    path = _prompt_file(tmp_path, n=2, bad=False)
    prompts = load_prompts(path, tmp_path)[0]
    qs = [["Is there a circle?"], [LONG, "Is it red?"], ["Is it blue?"]]
    recs = [
        {"answer_id": f"{prompts[k % 2].id}#{k}", "prompt_id": prompts[k % 2].id, "question": "q", "answer": "a",
         "claims": ["c"] * len(q), "questions": q, "error": None}
        for k, q in enumerate(qs)
    ]  # fmt: skip
    out = run_autocheck(policy, recs, prompts, tmp_path / "checked.jsonl", AutocheckConfig(labeler="t", batch_size=8))
    assert [r["error"] is None for r in out] == [True, False, True]
    assert len(out[0]["verdicts"]) == 1 and len(out[2]["verdicts"]) == 1
    (err,) = read_errors(tmp_path / "checked.jsonl")
    assert err["id"] == "shape1#1" and err["limit"] == 512 and err["stage"] == "autocheck"
