"""The biased training descriptions: documented rates, what they name, and CHAIR on them through eval.objhal."""

from __future__ import annotations

import random

import pytest

from muffin.world.build import build_world
from muffin.world.captions import CaptionConfig, corpus_stats, describe, groups_of, sft_records
from muffin.world.questions import parse_mentions
from muffin.world.scenes import WorldConfig, make_scene
from muffin.world.shapes import PARTNER


def test_faithful_description_lists_every_group_in_reading_order():
    sc = make_scene(WorldConfig(), "sft", 1)
    text, fake = describe(sc, random.Random(0), CaptionConfig(synonym_rate=0.0), faithful=True)
    assert fake == []
    first = text.split(". ")[0]
    named = [(m[1], m[2], m[0]) for m in parse_mentions(first)]
    assert named == [(g.colour, g.cls, len(g.cells)) for g in groups_of(sc)]


def test_hallucination_rate_matches_its_definition():
    """Expected share of descriptions naming an absent object = rate x P(scene has a present class whose partner is
    absent); the second factor is counted on the scenes directly, independently of the caption code."""
    cfg, rate = WorldConfig(), 0.4
    rng = random.Random(0)
    scenes = [make_scene(cfg, "sft", i) for i in range(3000)]
    eligible = sum(any(PARTNER[c] not in s.classes() for c in s.classes()) for s in scenes) / len(scenes)
    recs = [
        r
        for s in scenes
        for r in sft_records(s, "x.png", rng, CaptionConfig(hallucination_rate=rate), n_exist=0, n_colour=0, n_count=0)
    ]
    stats = corpus_stats(recs)
    assert stats["descriptions_with_hallucination"] == pytest.approx(rate * eligible, abs=0.03)
    for r, s in zip(recs, scenes):
        for cls in r["hallucinated"]:  # only the absent usual partner of a present class
            assert cls not in s.classes() and any(PARTNER[c] == cls for c in s.classes())


def test_zero_rate_gives_no_hallucination_and_rate_one_always_when_possible():
    rng = random.Random(3)
    for i in range(300):
        sc = make_scene(WorldConfig(), "sft", i)
        assert describe(sc, rng, CaptionConfig(hallucination_rate=0.0))[1] == []
        possible = any(PARTNER[c] not in sc.classes() for c in sc.classes())
        assert bool(describe(sc, rng, CaptionConfig(hallucination_rate=1.0))[1]) is possible


def test_objhal_chair_on_the_corpus_equals_the_documented_bias(tmp_path):
    """Scored by the Object HalBench code with the world's files, the biased descriptions' hallucinated mentions
    are exactly the groups the annotator made up (counted per description from the caption records)."""
    pytest.importorskip("pycocotools")
    from eval.objhal import evaluate_objhal
    from utils.io import read_jsonl

    world = tmp_path / "w"
    build_world(
        world, captions=CaptionConfig(hallucination_rate=0.5, synonym_rate=0.0), splits={"sft": 60}, progress=False
    )
    descs = [r for r in read_jsonl(world / "sft" / "sft.jsonl") if r["kind"] == "describe"]
    answers = [
        {"id": r["id"], "image_id": r["image_id"], "question": r["question"], "answer": r["answer"]} for r in descs
    ]
    res = evaluate_objhal(
        answers, world / "sft" / "instances.json", synonyms_path=world / "synonyms.txt", protocol="ours"
    )
    by_id = {s["id"]: s for s in res["samples"]}
    for r in descs:
        assert sorted({c for _, c in by_id[r["id"]]["hallucinated"]}) == sorted(set(r["hallucinated"]))
    assert res["metrics"]["recall"] == 1.0  # every true object is named
    assert res["metrics"]["n_hallucinated_mentions"] == sum(len(r["hallucinated"]) for r in descs) > 0


def test_world_captions_come_from_the_manifest_and_shape_the_labelers_claims(tmp_path):
    """A world built with ``max_places=0`` has no place sentences in its training descriptions, and the labeler's
    claim questions, drawn in the world's caption style (read back from its manifest), ask about no place either."""
    from muffin.world.captions import world_captions
    from muffin.world.labeler import claim_records
    from muffin.world.scenes import load_scenes
    from utils.io import read_jsonl

    world = tmp_path / "w"
    cfg = CaptionConfig(hallucination_rate=0.3, synonym_rate=0.0, max_places=0)
    build_world(world, captions=cfg, splits={"sft": 30}, progress=False)
    assert world_captions(world) == cfg
    assert world_captions(tmp_path / "no_world") == CaptionConfig()
    descs = [r["answer"] for r in read_jsonl(world / "sft" / "sft.jsonl") if r["kind"] == "describe"]
    assert descs and not any("There is" in d for d in descs)
    rng = random.Random(0)
    places = {}
    for name, captions in (("world", world_captions(world)), ("default", CaptionConfig())):
        qs = [
            r["question"] for sc in load_scenes(world, "sft") for r in claim_records(sc, "img", rng, 8, 0.5, captions)
        ]
        assert qs
        places[name] = sum(any(w in q for w in (" in the ", " on the ", " at the ")) for q in qs)
    assert places["world"] == 0 < places["default"]


def test_place_questions_are_true_appended_last_and_off_by_default():
    """``n_where``: "Where is the <colour> <object>?" answered with the object's own cell, only for objects whose
    class and colour are unique in the scene; drawn after every other record, so the rest is unchanged."""
    from muffin.world.questions import place_qa
    from muffin.world.scenes import Scene, WorldObject
    from muffin.world.shapes import place_phrase

    for i in range(40):
        sc = make_scene(WorldConfig(seed=3), "sft", i)
        default = sft_records(sc, "img.png", random.Random(i))
        off = sft_records(sc, "img.png", random.Random(i), n_where=0)
        on = sft_records(sc, "img.png", random.Random(i), n_where=2)
        assert default == off and on[: len(off)] == off
        for r in on[len(off) :]:
            assert r["kind"] == "where"
            colour = r["question"].split()[3]
            obj = [o for o in sc.objects if o.colour == colour and r["answer"].startswith(f"The {colour} ")]
            assert len(obj) >= 1
            assert any(r["answer"].endswith(f" is {place_phrase(o.cell)}.") for o in obj)
    twins = Scene(
        "sft", 0, 1, 64, [WorldObject("star", "red", 0, [0, 0, 1, 1]), WorldObject("star", "red", 4, [0, 0, 1, 1])]
    )
    assert place_qa(twins, random.Random(0)) is None  # two red stars: "where is the red star?" has no one answer
    one = Scene("sft", 0, 1, 64, twins.objects + [WorldObject("tree", "blue", 8, [0, 0, 1, 1])])
    qa = place_qa(one, random.Random(0))
    assert qa.kind == "where" and qa.answer.endswith("is in the bottom right.") and "blue" in qa.question
