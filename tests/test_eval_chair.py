"""CHAIR / Object HalBench on hand-built answers and a small COCO-format file; expected numbers derived by hand.

Ground truth of the fixture (instances + captions):
  image 1: person, dog            image 2: couch (+ cat from its caption)        image 3: dining table (caption)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.chair import RuleExtractor, load_synonyms, singularize, tokenize
from eval.judges import JudgeRequest, JudgeResponse, JudgeStats
from eval.objhal import evaluate_objhal

# The 80 COCO 2014 category names in category-id order, written out independently of the synonym table.
COCO_80 = (
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, stop sign, "
    "parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, backpack, umbrella, "
    "handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, "
    "surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, "
    "broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, "
    "laptop, mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, "
    "scissors, teddy bear, hair drier, toothbrush"
).split(", ")


@pytest.fixture()
def coco_files(tmp_path: Path) -> tuple[Path, Path]:
    cats = [
        {"id": 1, "name": "person"},
        {"id": 18, "name": "dog"},
        {"id": 63, "name": "couch"},
        {"id": 62, "name": "chair"},
        {"id": 67, "name": "dining table"},
        {"id": 17, "name": "cat"},
    ]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 10, "height": 10} for i in (1, 2, 3)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1},
        {"id": 2, "image_id": 1, "category_id": 18},
        {"id": 3, "image_id": 1, "category_id": 1},
        {"id": 4, "image_id": 2, "category_id": 63},
    ]
    for a in anns:
        a.update(bbox=[0, 0, 1, 1], area=1, iscrowd=0)
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    caps = tmp_path / "captions.json"
    caps.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": [
                    {"id": 10, "image_id": 2, "caption": "A cat sleeping on a sofa."},
                    {"id": 11, "image_id": 3, "caption": "An empty room with a wooden table."},
                ],
            }
        )
    )
    return inst, caps


ANSWERS = [
    {"id": "a1", "image_id": 1, "question": "Describe.", "answer": "A man walks his dog past a red car."},
    {"id": "a2", "image_id": 2, "question": "Describe.", "answer": "Two cats rest on the couch. The cat looks calm."},
    {"id": "a3", "image_id": 3, "question": "Describe.", "answer": "Empty room."},
    {"id": "a4", "image_id": 3, "question": "Describe.", "answer": "A chair stands next to the table."},
    {"id": "a5", "image_id": 999, "question": "Describe.", "answer": "A dog."},
    {"question": "Describe.", "answer": "No ids at all."},
]


def test_coco_table_covers_the_80_classes():
    assert len(COCO_80) == 80
    assert load_synonyms().classes == COCO_80


def test_singularize_and_tokenize():
    assert [singularize(w) for w in "people knives buses skis glasses boxes ponies horses sheep bus".split()] == (
        "person knife bus ski glass box pony horse sheep bus".split()
    )
    assert tokenize("The dog's double-decker bus!") == ["the", "dog", "double", "decker", "bus"]


def test_rule_extractor_multiword_modifiers_and_stop_phrases():
    ext = RuleExtractor.for_table(load_synonyms(), coco_rules=True)
    got = [
        (m.surface, m.cls)
        for m in ext.mentions(
            "Two men watch a baby elephant near hot dogs, a teddy bear and wine glasses on the tennis court."
        )
    ]
    assert got == [
        ("man", "person"),
        ("elephant", "elephant"),
        ("hot dog", "hot dog"),
        ("teddy bear", "teddy bear"),
        ("wine glass", "wine glass"),
    ]


def test_chair_metrics_rule_extractor(coco_files):
    """Scored answers a1-a4 (a5: image 999 not in COCO; record 5: no id): unique (surface, class) mentions
    a1 {man/person, dog, car*}, a2 {cat, couch}, a3 {}, a4 {chair*, table/dining table} (* hallucinated).
    CHAIRs 2/4; response hallucination 2/3 (a3 mentions nothing); CHAIRi 2/7; recall (2+2+0+1)/(2+2+1+1) = 5/6;
    mean length (9 + 10 + 2 + 7) / 4 = 7."""
    inst, caps = coco_files
    res = evaluate_objhal(ANSWERS, inst, captions_path=caps, extractor="rule", protocol="ours")
    m = res["metrics"]
    assert m["chair_s"] == pytest.approx(0.5)
    assert m["response_hallucination"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(2 / 7)
    assert m["recall"] == pytest.approx(5 / 6)
    assert m["mean_length"] == pytest.approx(7.0)
    assert (m["n_answers"], m["n_errors"], m["n_records"]) == (4, 2, 6)
    by_id = {s["id"]: s for s in res["samples"]}
    assert by_id["a1"]["hallucinated"] == [["car", "car"]]
    assert by_id["a2"]["gt_objects"] == ["cat", "couch"]  # the cat comes from the caption file
    assert "not in" in by_id["a5"]["error"] and "no 'id'" in by_id["record-5"]["error"]


def test_ground_truth_without_captions(coco_files):
    """Without captions, image 2's truth is {couch} and image 3's is empty: a2's cat and a4's table become
    hallucinations. CHAIRi = (car + cat + chair + table) / 7 = 4/7."""
    inst, _ = coco_files
    m = evaluate_objhal(ANSWERS[:4], inst, extractor="rule", protocol="ours")["metrics"]
    assert m["chair_i"] == pytest.approx(4 / 7) and m["chair_s"] == pytest.approx(3 / 4)


class CannedJudge:
    """A Judge (the protocol) answering from a table keyed by a substring of the request; ``fail_after``
    simulates a crash (an exception out of ``complete``) after that many calls."""

    def __init__(self, table: dict[str, str], fail_after: int | None = None) -> None:
        self.id, self.stats, self.table, self.fail_after, self.asked = "canned", JudgeStats(), table, fail_after, []

    def complete(self, requests: list[JudgeRequest], *, progress: bool = False) -> list[JudgeResponse]:
        out = []
        for r in requests:
            if self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise RuntimeError("simulated crash")
            text = r.messages[-1][1]
            self.asked.append(text)
            self.stats.add(calls=1)
            out.append(JudgeResponse(next((v for k, v in self.table.items() if k in text), "garbage")))
        return out


JUDGE_TABLE = {"red car": '```json\n["man", "dog", "red car"]\n```', "Two cats": "['cats', 'sofa']"}


def test_chair_with_judge_extraction_and_unparseable_output(coco_files, tmp_path):
    """a3 (2 words) skips the judge; a4's judge output never parses (recorded, excluded). Over a1-a3:
    CHAIRs 1/3, response hallucination 1/2, CHAIRi 1/5, recall (2+2+0)/(2+2+1) = 4/5, mean length 21/3 = 7."""
    inst, caps = coco_files
    judge = CannedJudge(JUDGE_TABLE)
    res = evaluate_objhal(
        ANSWERS[:4], inst, captions_path=caps, extractor=judge, reasks=1, out_dir=tmp_path / "o", protocol="ours"
    )
    m = res["metrics"]
    assert (m["chair_s"], m["response_hallucination"], m["chair_i"]) == pytest.approx((1 / 3, 1 / 2, 1 / 5))
    assert (m["recall"], m["mean_length"], m["n_errors"]) == pytest.approx((4 / 5, 7.0, 1))
    assert len(judge.asked) == 4  # a1, a2, a4 + one re-ask of a4; never a3
    a4 = [s for s in res["samples"] if s["id"] == "a4"][0]
    assert a4["error"] == "unparseable object list after 2 attempts" and a4["judge_output"] == "garbage"
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["judge"]["id"] == "canned" and results["judge"]["calls"] == 4
    assert results["metrics"]["chair_i"] == pytest.approx(1 / 5) and "code_version" in results


def test_resume_after_crash_mid_scoring(coco_files, tmp_path):
    """The judge dies on its 3rd call (chunk size 1): a1 and a2 are on disk; a torn line is appended as a
    crash mid-write would leave. The rerun asks only about a4 and ends with the uninterrupted metrics."""
    inst, caps = coco_files
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_objhal(
            ANSWERS[:4],
            inst,
            captions_path=caps,
            extractor=CannedJudge(JUDGE_TABLE, fail_after=2),
            out_dir=out,
            chunk_size=1,
            reasks=0,
            protocol="ours",
        )
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a1", "a2", "a3"]  # a3 needs no judge call
    with (out / "samples.jsonl").open("a") as f:
        f.write('{"id": "a4", "mentions": [')  # torn record
    judge = CannedJudge(JUDGE_TABLE)
    resumed = evaluate_objhal(
        ANSWERS[:4], inst, captions_path=caps, extractor=judge, out_dir=out, chunk_size=1, reasks=0, protocol="ours"
    )
    assert len(judge.asked) == 1 and ANSWERS[3]["answer"] in judge.asked[0]
    fresh = evaluate_objhal(
        ANSWERS[:4], inst, captions_path=caps, extractor=CannedJudge(JUDGE_TABLE), reasks=0, protocol="ours"
    )
    assert resumed["metrics"] == fresh["metrics"]


def test_generic_synonym_table_and_categories(tmp_path):
    """A synthetic world's own table and COCO-format file: 'red disk' is a red circle, 'green triangle' is in
    the table but not in the image (hallucinated), 'sky' is not a class. CHAIRi = 1/3, recall = 2/2."""
    table = tmp_path / "shapes.txt"
    table.write_text("red circle, red disk\nblue square, blue box\ngreen triangle\n")
    inst = tmp_path / "shapes.json"
    inst.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "7.png", "width": 8, "height": 8}],
                "categories": [
                    {"id": 1, "name": "red circle"},
                    {"id": 2, "name": "blue square"},
                    {"id": 3, "name": "green triangle"},
                ],
                "annotations": [
                    {"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
                    {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0},
                ],
            }
        )
    )
    answers = [{"image_id": 7, "answer": "A red disk under the sky, two blue boxes and a green triangle."}]
    m = evaluate_objhal(answers, inst, synonyms_path=table, protocol="ours")["metrics"]
    assert m["chair_i"] == pytest.approx(1 / 3) and m["recall"] == 1.0 and m["chair_s"] == 1.0


def test_duplicate_surface_form_is_an_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("dog, puppy\ncat, puppy\n")
    with pytest.raises(ValueError, match="bad.txt:2: 'puppy' is listed for both 'dog' and 'cat'"):
        load_synonyms(bad)


def test_published_synonym_table_loads_and_maps(reference_dir):
    table = load_synonyms(reference_dir / "data" / "rlaifv-original" / "eval" / "synonyms_refine.txt")
    assert len(table.classes) == 80
    got = {m.cls for m in RuleExtractor(table).mentions("A woman rides a motorbike past a jetliner.")}
    assert got == {"person", "motorcycle", "airplane"}


def test_duplicate_answer_ids_are_reported_not_merged(coco_files):
    inst, _ = coco_files
    answers = [{"id": "x", "image_id": 1, "answer": "A dog."}, {"id": "x", "image_id": 1, "answer": "A car."}]
    res = evaluate_objhal(answers, inst, protocol="ours")
    assert res["metrics"]["n_answers"] == 1 and res["metrics"]["chair_s"] == 0.0
    assert [s["id"] for s in res["samples"]] == ["x", "x#duplicate-1"]
    assert "repeats id 'x'" in res["samples"][1]["error"]
