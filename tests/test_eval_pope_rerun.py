"""POPE reruns into the same --out-dir: a changed answer is rescored in place (no stale record beside the new
metrics); another question file is refused before scoring (docs/RESUMING.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.pope import main
from utils.fingerprint import StaleOutputError


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_changed_answer_rescored_and_other_questions_refused(tmp_path: Path) -> None:
    """Two questions of the random split, labels yes / no. Answers "Yes." / "No." -> accuracy 1; the second answer
    changed to "Yes, there is." -> 1/2, and samples.jsonl holds that answer, not the old one."""
    qs = _write(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
    ])  # fmt: skip
    answers = tmp_path / "answers.jsonl"
    out = tmp_path / "out"
    _write(answers, [{"id": "random/1", "answer": "Yes."}, {"id": "random/2", "answer": "No."}])
    main(["--answers", str(answers), "--questions", str(qs), "--out-dir", str(out)])
    assert json.loads((out / "results.json").read_text())["metrics"]["splits"]["random"]["accuracy"] == 1.0
    _write(answers, [{"id": "random/1", "answer": "Yes."}, {"id": "random/2", "answer": "Yes, there is."}])
    main(["--answers", str(answers), "--questions", str(qs), "--out-dir", str(out)])
    assert json.loads((out / "results.json").read_text())["metrics"]["splits"]["random"]["accuracy"] == 0.5
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["answer"] for s in samples] == ["Yes.", "Yes, there is."]
    other = _write(tmp_path / "coco_pope_popular.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    ])  # fmt: skip
    with pytest.raises(StaleOutputError, match="questions"):
        main(["--answers", str(answers), "--questions", str(other), "--out-dir", str(out)])
