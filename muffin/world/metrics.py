"""What CHAIR does not see, on answers about world scenes: instances, counts, colours and places, per source.

``answer_checks`` reads one answer with the world's parser (``questions.parse_mentions``) and checks every asserted
object group (class, colour and count) and every place sentence against the scene; ``world_metrics`` sums the
checks over answers into rates, each error attributed to the hallucination source it belongs to
(``captions.SOURCES``: partner, colour, count, position; ``other`` for absent classes that are no partner).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from muffin.world.captions import COLOUR_CONFUSIONS
from muffin.world.questions import count_of, parse_mentions
from muffin.world.scenes import Scene
from muffin.world.shapes import CELL_NAMES, PARTNER

# the error counts world_metrics sums; the sources of captions.SOURCES plus absent classes that are no partner
ERROR_KINDS = ("partner", "other", "colour", "count", "position")
# flat names the loop selects on (muffin.loop.SELECTION_METRICS) and which way is better
SELECTION = {
    "instance_precision": "max",
    "count_accuracy": "max",
    "partner_rate": "min",
    "colour_error": "min",
    "count_error": "min",
    "overcount_error": "min",
    "position_error": "min",
    "source_error": "min",
}


def answer_checks(scene: Scene, answer: str) -> dict[str, int]:
    """Counts for one answer (see ``world_metrics`` for their meaning).

    An object group is the (colour, class) a mention names, the counts of its mentions without a place summed: "a
    blue heart and a blue heart" asserts two blue hearts. A mention with a place ("There is a red star in the top
    left.") is a place claim about one object, not a new instance.
    """
    asserted: dict[tuple[str | None, str], int] = {}
    c = dict.fromkeys(
        ("groups", "instances", "true_instances", "counted_groups", "right_counts", "coloured_groups")
        + ("place_claims", "place_claims_judged", "colour_confusions", "overcounts", "undercounts")
        + ERROR_KINDS,
        0,
    )
    present = scene.classes()
    partners = {PARTNER[k] for k in present}
    for count, colour, cls, where in parse_mentions(answer):
        if where is None:
            asserted[(colour, cls)] = asserted.get((colour, cls), 0) + count
            continue
        c["place_claims"] += 1
        if count_of(scene, cls, colour) >= 1:  # a place claim about an object that exists: is it there?
            c["place_claims_judged"] += 1
            c["position"] += count_of(scene, cls, colour, CELL_NAMES.index(where)) == 0
    for (colour, cls), n in asserted.items():
        true = count_of(scene, cls, colour)
        c["groups"] += 1
        c["instances"] += n
        c["true_instances"] += min(n, true)
        if count_of(scene, cls) == 0:
            c["partner" if cls in partners else "other"] += 1
            continue
        if colour is not None:
            c["coloured_groups"] += 1
            if true == 0:
                c["colour"] += 1
                confused = {k for k, v in COLOUR_CONFUSIONS.items() if v == colour}
                c["colour_confusions"] += any(count_of(scene, cls, k) for k in confused)
                continue
        c["counted_groups"] += 1
        c["right_counts"] += n == true
        c["count"] += n != true
        c["overcounts"] += n > true
        c["undercounts"] += n < true
    return c


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def world_metrics(answers: Sequence[dict[str, Any]], scenes: dict[int, Scene]) -> dict[str, Any]:
    """Instance, count, colour and place checks of ``answers`` (records with ``image_id`` and ``answer``).

    Returns the summed counts (``counts``) and the rates:

    - ``instance_precision``: asserted instances that exist, class, colour and count checked (an asserted group of
      n objects holds min(n, true count) true instances);
    - ``count_accuracy``: asserted groups of the right class and colour whose number is right;
    - per source: ``partner_rate`` and ``other_rate`` (groups naming an absent class, a partner of a present one or
      not, per asserted group), ``colour_error`` (present classes named in a colour they lack, per group with a
      colour), ``overcount_error`` (groups asserted with more objects than the scene has, per counted group: the
      count source's hallucination, ``captions``' one too many), ``position_error`` (place claims about an existing
      object naming a cell it is not in, per such claim);
    - ``count_error`` (1 - count accuracy) = ``overcount_error`` + ``undercount_error``; an undercount ("a blue
      heart" for two) asserts nothing false, it leaves objects out, as a lower recall does;
    - ``source_error``: the four planted sources' rates averaged (an undefined one left out);
    - ``per_answer``: each error kind per answer (what an answer that says less also lowers; the rates do not).
    """
    total: dict[str, int] = {}
    n_answers = 0
    for rec in answers:
        if rec.get("answer") is None:
            continue
        if rec["image_id"] not in scenes:
            raise KeyError(f"answer about image {rec['image_id']}: not a scene of this world's splits")
        n_answers += 1
        for k, v in answer_checks(scenes[rec["image_id"]], rec["answer"]).items():
            total[k] = total.get(k, 0) + v
    t = total
    out: dict[str, Any] = {
        "answers": n_answers,
        "instance_precision": _rate(t.get("true_instances", 0), t.get("instances", 0)),
        "count_accuracy": _rate(t.get("right_counts", 0), t.get("counted_groups", 0)),
        "partner_rate": _rate(t.get("partner", 0), t.get("groups", 0)),
        "other_rate": _rate(t.get("other", 0), t.get("groups", 0)),
        "colour_error": _rate(t.get("colour", 0), t.get("coloured_groups", 0)),
        "count_error": _rate(t.get("count", 0), t.get("counted_groups", 0)),
        "overcount_error": _rate(t.get("overcounts", 0), t.get("counted_groups", 0)),
        "undercount_error": _rate(t.get("undercounts", 0), t.get("counted_groups", 0)),
        "position_error": _rate(t.get("position", 0), t.get("place_claims_judged", 0)),
    }
    rates = [
        out[k] for k in ("partner_rate", "colour_error", "overcount_error", "position_error") if out[k] is not None
    ]
    out["source_error"] = sum(rates) / len(rates) if rates else None
    out["per_answer"] = {k: _rate(t.get(k, 0), n_answers) for k in ERROR_KINDS + ("place_claims",)}
    out["counts"] = t
    return out


# the error kinds a pair's two answers are compared on (pair_signal): the sources, the count split into the planted
# overcount and the undercount (an omission), and absent classes that are no partner
PAIR_KINDS = ("partner", "other", "colour", "overcount", "undercount", "position")


def _pair_errors(c: dict[str, int]) -> dict[str, int]:
    return {**{k: c[k] for k in ("partner", "other", "colour", "position")},
            "overcount": c["overcounts"], "undercount": c["undercounts"]}  # fmt: skip


def pair_signal(pairs: Sequence[dict[str, Any]], scene_of: Any) -> dict[str, Any]:
    """What a round's preference pairs teach about each error kind: per kind of ``PAIR_KINDS``, the pairs whose
    chosen answer makes fewer such errors than the rejected one (``fewer``: DPO pushes the error down), more
    (``more``: it pushes the error up) and their difference as a share of the pairs (``net``). ``scene_of`` maps a
    pair's ``prompt_id`` to its scene. A labeler that cannot see a kind of error leaves its ``net`` near 0 or below."""
    n = 0
    tally = {k: {"fewer": 0, "more": 0} for k in PAIR_KINDS}
    for p in pairs:
        scene = scene_of(p["prompt_id"])
        chosen, rejected = (_pair_errors(answer_checks(scene, p[k])) for k in ("chosen", "rejected"))
        n += 1
        for k in PAIR_KINDS:
            tally[k]["fewer"] += chosen[k] < rejected[k]
            tally[k]["more"] += chosen[k] > rejected[k]
    for t in tally.values():
        t["net"] = _rate(t["fewer"] - t["more"], n)
    return {"pairs": n, "by_kind": tally}
