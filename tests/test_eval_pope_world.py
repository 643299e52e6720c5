"""POPE on the synthetic world (question construction by hand-built scenes) and the loop's GPT-free selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from muffin.loop import Benchmark, LoopConfig, evaluate_checkpoint, select_checkpoint
from muffin.world.questions import pope_records
from muffin.world.scenes import Scene, WorldObject


def _scene(index: int, *classes_cells: tuple[str, int]) -> Scene:
    objs = [WorldObject(c, "red", cell, [0, 0, 1, 1]) for c, cell in classes_cells]
    return Scene("test", index, 4_000_000 + index, 32, objs)


SCENES = [_scene(0, ("star", 0), ("moon", 1)), _scene(1, ("star", 0), ("circle", 4)), _scene(2, ("square", 2))]


def _asked(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["text"].split()[3], r["label"]) for r in rows]  # "Is there a <class> in the image?"


def test_popular_negatives_follow_frequency() -> None:
    """Scene frequencies: star 2, moon 1, circle 1, square 1; ties in class order (circle, square, ..., moon), so the
    popular list is star, circle, square, moon, ... Each "yes" (a present class, reading order) is followed by the
    first listed class neither present nor asked in that scene:
    scene 0 (star, moon): star -> circle; moon -> square.  scene 1 (star, circle): star -> square; circle -> moon.
    scene 2 (square): square -> star."""
    rows = pope_records(SCENES, "popular")
    assert _asked(rows) == [
        ("star", "yes"), ("circle", "no"), ("moon", "yes"), ("square", "no"),
        ("star", "yes"), ("square", "no"), ("circle", "yes"), ("moon", "no"),
        ("square", "yes"), ("star", "no"),
    ]  # fmt: skip
    assert [r["question_id"] for r in rows] == list(range(1, 11))
    assert rows[0] == {
        "question_id": 1,
        "image": "test/images/test_000000.png",
        "text": "Is there a star in the image?",
        "label": "yes",
    }


def test_adversarial_negatives_follow_co_occurrence() -> None:
    """Co-occurrence: star with moon 1 and circle 1 (tie: circle first in class order); moon, circle only with star.
    scene 0: star -> circle; moon -> star is present, so a random free class (not star, moon, circle).
    scene 1: star -> circle present, moon; circle -> star present, random (not star, circle, moon).
    scene 2: square co-occurs with nothing -> random (not square)."""
    rows = pope_records(SCENES, "adversarial")
    asked = _asked(rows)
    assert asked[:2] == [("star", "yes"), ("circle", "no")] and asked[4:6] == [("star", "yes"), ("moon", "no")]
    assert asked[3][1] == "no" and asked[3][0] not in {"star", "moon", "circle"}
    assert asked[7][1] == "no" and asked[7][0] not in {"star", "circle", "moon"}
    assert asked[9][1] == "no" and asked[9][0] != "square"
    assert pope_records(SCENES, "adversarial") == rows  # seeded: the same file every time


def test_random_negatives_and_articles() -> None:
    rows = pope_records([_scene(0, ("arrow", 0))], "random", seed=3)
    assert rows[0]["text"] == "Is there an arrow in the image?" and rows[1]["label"] == "no"
    assert rows[1]["text"].split()[3] != "arrow"
    with pytest.raises(ValueError, match="unknown POPE strategy 'rare'"):
        pope_records(SCENES, "rare")


def test_selection_takes_the_highest_pope_f1() -> None:
    """Higher is better for pope_f1; an undefined score ranks last; POPE has no recall, so no floor applies."""
    cands = {"start": {"pope_f1": 0.70}, "checkpoint-10": {"pope_f1": 0.80}, "checkpoint-20": {"pope_f1": None}}
    assert select_checkpoint(cands, {"recall": None}, "pope_f1", 0.05) == "checkpoint-10"
    chair = {"a": {"chair_i": 0.2, "recall": 0.5}, "b": {"chair_i": 0.1, "recall": 0.5}}
    assert select_checkpoint(chair, {"recall": 0.5}, "chair_i", 0.05) == "b"  # CHAIR: lowest, as before


def test_loop_config_checks_metric_and_benchmark(tmp_path: Path) -> None:
    base = {"output_dir": str(tmp_path), "policy": "p", "prompts": "q.jsonl"}
    pope = {"questions": "pope/", "kind": "pope"}
    LoopConfig(**base, selection=pope, metric="pope_f1")
    with pytest.raises(ValueError, match="needs a selection benchmark of kind 'pope'"):
        LoopConfig(**base, selection={"questions": "q.jsonl", "annotations": ["i.json"]}, metric="pope_f1")
    with pytest.raises(ValueError, match="use metric pope_f1 or pope_accuracy"):
        LoopConfig(**base, selection=pope, metric="chair_i")
    with pytest.raises(ValueError, match="needs 'data_dir'"):
        Benchmark("query.json", kind="amber")
    with pytest.raises(ValueError, match="unknown benchmark kind 'mme'"):
        Benchmark("q.json", kind="mme")


def test_checkpoint_evaluated_on_pope(tiny_llava: Path, tmp_path: Path) -> None:
    """A tiny random model answers 4 POPE questions; the loop's metrics are eval.pope's mean over the one split."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "img" / "a.jpg")
    rows = [
        {"question_id": i, "image": "a.jpg", "text": f"Is there a {c} in the image?", "label": lab}
        for i, (c, lab) in enumerate([("star", "yes"), ("dog", "no"), ("moon", "yes"), ("cat", "no")], 1)
    ]
    qfile = tmp_path / "coco_pope_random.json"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = Benchmark(str(qfile), kind="pope", image_root=str(tmp_path / "img"), decoding={"max_new_tokens": 4})
    m = evaluate_checkpoint(str(tiny_llava), bench, tmp_path / "eval", batch_size=4)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["benchmark"] == "pope" and m["n_answers"] == 4
    assert m["pope_f1"] == results["metrics"]["mean"]["f1"] and m["chair_i"] is None and m["recall"] is None
    assert evaluate_checkpoint(str(tiny_llava), bench, tmp_path / "eval") == m  # cached
