"""The demo's bar over every hallucination source (muffin.world.demo check) and the comparison's source columns."""

from __future__ import annotations

import json

import pytest

from muffin.world.demo import check, compare, compare_table, source_changes


def _row(it: int, chair: float, resp: float, recall: float, **world: float) -> dict:
    return {"iteration": it, "chair_i": chair, "response_hallucination": resp, "recall": recall, "world": world}


BASE = _row(
    0, 0.10, 0.30, 0.95, partner_rate=0.08, colour_error=0.40, overcount_error=0.60, position_error=0.80,
    count_accuracy=0.40, instance_precision=0.70,
)  # fmt: skip


def test_bar_holds_every_source_to_half_of_the_base():
    """Every measure at most half of the base, recall and count accuracy at most 5 points down: passes; a source
    left at 0.6 of its base (position 0.48 > 0.40) or count accuracy 6 points down fails, each named."""
    final = _row(
        4, 0.04, 0.12, 0.93, partner_rate=0.03, colour_error=0.20, overcount_error=0.30, position_error=0.40,
        count_accuracy=0.70, instance_precision=0.90,
    )  # fmt: skip
    assert check({"heldout": [BASE, final]}) == []
    final["world"]["position_error"] = 0.48
    final["world"]["count_accuracy"] = 0.34
    failures = check({"heldout": [BASE, final]})
    assert len(failures) == 2
    assert failures[0].startswith("position_error: final 0.4800 > 0.5 x base 0.8000")
    assert failures[1].startswith("count_accuracy: final 0.3400 is more than 0.05 below base 0.4000")


def test_bar_names_a_source_nobody_claimed_and_reads_old_reports_on_chair_alone():
    final = _row(
        4, 0.04, 0.12, 0.93, partner_rate=0.03, colour_error=0.20, overcount_error=0.30, position_error=None,
        count_accuracy=0.70,
    )  # fmt: skip
    assert check({"heldout": [BASE, final]}) == [
        "position_error is undefined (no answer made such a claim); nothing to compare"
    ]
    old = [{k: r[k] for k in ("chair_i", "response_hallucination", "recall")} for r in (BASE, final)]
    assert check({"heldout": old}) == []


def test_compare_reports_each_sources_change(tmp_path):
    """Two seeds: partner 0.08 -> 0.04 and 0.02 (-50 %, -75 %: mean -62.5, sd 17.7); count accuracy +0.1, +0.3."""
    runs = []
    for seed, (partner, acc) in enumerate([(0.04, 0.5), (0.02, 0.7)]):
        final = _row(4, 0.05, 0.15, 0.94, partner_rate=partner, colour_error=0.2, overcount_error=0.3,
                     position_error=0.8, count_accuracy=acc)  # fmt: skip
        d = tmp_path / f"s{seed}" / "ai"
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps({"heldout": [BASE, final], "iterations": []}))
        runs.append(d)
    s = compare(runs)["ai"]
    assert s["partner_rate_change"]["mean"] == pytest.approx(-0.625)
    assert s["partner_rate_change"]["sd"] == pytest.approx(0.1767767)
    assert s["count_accuracy_change"]["mean"] == pytest.approx(0.2)
    assert s["position_error_change"]["mean"] == pytest.approx(0.0)
    assert "-62.5 ± 17.7 / -50.0 ± 0.0 / -50.0 ± 0.0 / +0.0 ± 0.0 | +20.0 ± 14.1 |" in compare_table(compare(runs))
    assert source_changes({"chair_i": 0.1}, {"chair_i": 0.05}) == {}


def test_loop_selects_and_reports_the_worlds_checks():
    """Every selectable world check is a loop selection metric with the same direction; the report's per-round
    table prints them (70 % precision, 0.90 place claims per answer) and leaves a round without them out."""
    from muffin.loop import SELECTION_METRICS
    from muffin.loop_report import world_checks_table
    from muffin.world.metrics import SELECTION

    assert {k: SELECTION_METRICS[k] for k in SELECTION} == SELECTION
    lines = world_checks_table([{"iteration": 0, "world": {**BASE["world"], "per_answer": {"place_claims": 0.9}}},
                                {"iteration": 1}])  # fmt: skip
    assert lines[-1] == "| base | 70.0 | 40.0 | 8.0 | - | 40.0 | 60.0 | - | 80.0 | 0.90 |"


def test_world_truth_gives_the_loop_its_checks(tmp_path):
    """The loop's truth hook on a world split: ``metrics`` are the selectable checks of the answers in out_dir
    (one answer: the scene's first object named twice -> precision 1/2), ``heldout`` adds them in full under
    ``world``; a benchmark that is no world description split gets nothing."""
    from muffin.loop import Benchmark
    from muffin.world.build import build_world
    from muffin.world.demo import WorldGroundTruth
    from muffin.world.questions import mention
    from muffin.world.scenes import load_scenes

    world = tmp_path / "w"
    build_world(world, splits={"val": 3}, progress=False)
    scene = load_scenes(world, "val")[0]
    obj = scene.objects[0]
    n = sum(o.cls == obj.cls and o.colour == obj.colour for o in scene.objects)
    text = f"The image shows {mention(n, obj.colour, obj.cls)} and {mention(n, obj.colour, obj.cls)}."
    out = tmp_path / "eval"
    out.mkdir()
    (out / "answers.jsonl").write_text(json.dumps({"image_id": scene.image_id, "answer": text}) + "\n")
    truth = WorldGroundTruth(world, pope_scenes=0)
    bench = Benchmark.for_world(world, "val")
    m = truth.metrics(bench, out)
    assert m["instance_precision"] == 0.5 and m["count_accuracy"] == 0.0
    assert truth.heldout("unused", bench, out)["world"]["counts"]["instances"] == 2 * n
    val = world / "val"
    elsewhere = Benchmark(str(val / "prompts.jsonl"), [str(val / "instances.json")], image_root=str(tmp_path))
    assert truth.metrics(elsewhere, out) == {}


def test_report_plots_the_worlds_checks(tmp_path):
    pytest.importorskip("matplotlib")
    from muffin.loop_report import plot_world_checks

    final = {**BASE, "iteration": 1, "world": {**BASE["world"], "partner_rate": 0.02}}
    path = plot_world_checks(tmp_path / "sources.png", [BASE, final, {"iteration": 2}])
    assert path.is_file() and path.stat().st_size > 1000
