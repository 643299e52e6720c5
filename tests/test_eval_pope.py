"""POPE scoring on the published COCO split files (../shared/reference/pope), expected numbers derived by hand.

Facts of the published files used below (read off the files, checked in ``test_published_layout``): each split
has 3000 questions over 500 images, question ids 1..3000, and the label alternates: odd ids "yes", even ids "no"
(1500 each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.answer import pope_questions
from eval.pope import evaluate_pope, normalize_yes_no, split_of


@pytest.fixture(scope="module")
def pope_dir(reference_dir: Path) -> Path:
    path = reference_dir / "pope" / "output" / "coco"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def test_published_layout(pope_dir: Path) -> None:
    for split in ("random", "popular", "adversarial"):
        rows = [json.loads(line) for line in (pope_dir / f"coco_pope_{split}.json").read_text().splitlines()]
        assert [r["question_id"] for r in rows] == list(range(1, 3001))
        assert all(r["label"] == ("yes" if r["question_id"] % 2 else "no") for r in rows)
        assert len({r["image"] for r in rows}) == 500


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a snowboard in the image.", "yes"),
        ("No.", "no"),
        ("No, there is no dog.", "no"),
        ("There is no dog in the image.", "no"),  # "no" as a word of the first sentence
        ("I do not see a car", "no"),  # "not"
        ("Yes. There is no dog, though.", "yes"),  # only the first sentence counts
        ("Not at all.", "yes"),  # case-sensitive as published: "Not" is not "not"
        ("NO", "yes"),  # likewise
        ("No,there is none", "yes"),  # commas are deleted, not spaced: "Nothere" is no word of the list
        ("Nothing like that.", "yes"),  # words, not substrings
        ("", "yes"),
    ],
)
def test_normalize_follows_the_published_rule(text: str, expected: str) -> None:
    assert normalize_yes_no(text) == expected


def _answers(pope_dir: Path) -> list[dict]:
    """random: "Yes" to all; popular: every answer right; adversarial: yes-questions with id = 1 (mod 4) answered
    "Yes.", those with id = 3 (mod 4) "No.", every no-question "There is not one."."""
    out = []
    for q in pope_questions(pope_dir):
        split, qid = q["split"], int(q["id"].split("/")[1])
        if split == "random":
            text = "Yes"
        elif split == "popular":
            text = "Yes, there is." if qid % 2 else "No, there is not."
        else:
            text = "Yes." if qid % 4 == 1 else "No." if qid % 4 == 3 else "There is not one."
        out.append({"id": q["id"], "question": q["question"], "answer": text})
    return out


def test_scores_on_the_published_splits(pope_dir: Path, tmp_path: Path) -> None:
    """Per split ("yes" positive):
    random:      TP 1500, FP 1500, TN 0, FN 0 -> accuracy 0.5, precision 0.5, recall 1, F1 2*0.5*1/1.5 = 2/3,
                 yes-ratio 1.
    popular:     TP 1500, TN 1500 -> all 1, yes-ratio 0.5.
    adversarial: yes-questions: ids 1, 5, ... (750) answered yes -> TP 750; ids 3, 7, ... (750) no -> FN 750;
                 no-questions all "no" -> TN 1500, FP 0. accuracy 2250/3000 = 0.75, precision 750/750 = 1,
                 recall 750/1500 = 0.5, F1 = 2*1*0.5/1.5 = 2/3, yes-ratio 750/3000 = 0.25.
    mean:        accuracy (0.5+1+0.75)/3 = 0.75, F1 (2/3+1+2/3)/3 = 7/9, yes-ratio (1+0.5+0.25)/3 = 7/12.
    """
    res = evaluate_pope(_answers(pope_dir), pope_dir, out_dir=tmp_path)
    m = res["metrics"]
    r, p, a = (m["splits"][s] for s in ("random", "popular", "adversarial"))
    assert list(m["splits"]) == ["random", "popular", "adversarial"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1500, 1500, 0, 0)
    assert r["accuracy"] == 0.5 and r["precision"] == 0.5 and r["recall"] == 1.0 and r["yes_ratio"] == 1.0
    assert r["f1"] == pytest.approx(2 / 3)
    assert (p["accuracy"], p["precision"], p["recall"], p["f1"], p["yes_ratio"]) == (1.0, 1.0, 1.0, 1.0, 0.5)
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (750, 0, 1500, 750)
    assert (a["accuracy"], a["precision"], a["recall"], a["yes_ratio"]) == (0.75, 1.0, 0.5, 0.25)
    assert a["f1"] == pytest.approx(2 / 3)
    assert m["mean"]["accuracy"] == pytest.approx(0.75)
    assert m["mean"]["f1"] == pytest.approx(7 / 9)
    assert m["mean"]["yes_ratio"] == pytest.approx(7 / 12)
    assert (m["n_questions"], m["n_scored"], m["n_errors"], m["n_missing"]) == (9000, 9000, 0, 0)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["benchmark"] == "pope" and results["judge"] is None
    assert results["metrics"]["splits"]["adversarial"]["tn"] == 1500
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 9000


def test_unanswered_and_missing_are_counted_not_scored(pope_dir: Path, tmp_path: Path) -> None:
    """Only the random split's first four questions (labels yes, no, yes, no): answers "Yes", "No", an answer-stage
    failure (None) and nothing for id 4. Scored: TP 1 (id 1), TN 1 (id 2) -> accuracy 1; 1 error, 2996 missing."""
    answers = [
        {"id": "random/1", "answer": "Yes"},
        {"id": "random/2", "answer": "No"},
        {"id": "random/3", "answer": None, "error": "image not found"},
    ]
    m = evaluate_pope(answers, pope_dir / "coco_pope_random.json", out_dir=tmp_path)["metrics"]
    assert (m["n_scored"], m["n_errors"], m["n_missing"]) == (2, 1, 2997)
    assert m["splits"]["random"]["accuracy"] == 1.0
    # a rerun keeps the finished records (one line per id) and gives the same numbers
    again = evaluate_pope(answers, pope_dir / "coco_pope_random.json", out_dir=tmp_path)["metrics"]
    assert again == m
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3


def test_answer_stage_reads_the_question_files(pope_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "COCO_val2014_000000310196.jpg"  # the image of the adversarial split's first questions
    img.write_bytes(b"")
    qs = pope_questions(pope_dir / "coco_pope_adversarial.json", tmp_path)
    assert len(qs) == 3000 and split_of(pope_dir / "coco_pope_adversarial.json") == "adversarial"
    assert qs[0] == {
        "id": "adversarial/1",
        "split": "adversarial",
        "question": "Is there a snowboard in the image?",
        "image_file": "COCO_val2014_000000310196.jpg",
        "image": str(img),
    }
    assert qs[6]["image"] is None  # another image, not under the root: the answer stage reports it


def test_bad_question_file_names_the_record(tmp_path: Path) -> None:
    bad = tmp_path / "coco_pope_random.json"
    bad.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a cat?", "label": "maybe"}))
    with pytest.raises(ValueError, match="record 0: label 'maybe'"):
        evaluate_pope([], bad)
