"""Training descriptions for the base policy, written by a careless annotator with four habits (hallucination sources).

A true description lists every object group in reading order ("The image shows a red circle and two blue
squares.") and places up to two single objects ("There is a green triangle in the top right."), the style the
rule-based claim splitter handles. The annotator's habits, each at a documented rate (``CaptionConfig``):

* ``hallucination_rate`` (partner, default 0.5): when a present class's usual partner (``shapes.PAIRS``) is absent,
  the description also names that partner, in a random colour, at a random place of the list. Real captions and
  VLMs do the same with objects that usually co-occur (a fork next to a plate).
* ``colour_confusion_rate`` (colour): a group whose colour has a confusable neighbour (``COLOUR_CONFUSIONS``:
  orange is called red, purple blue) is named in the neighbour's colour.
* ``miscount_rate`` (count): a group of two or more objects is named with one object too many.
* ``place_error_rate`` (position): a place sentence names the mirror cell (left and right swapped; the middle
  column's top and bottom swapped; never the centre).
* ``synonym_rate`` (default 0.1): a class is named by one of its synonyms (exercises the CHAIR synonym table).

``corpus_stats`` measures each source's rate on the generated corpus (``build.py`` writes it to the manifest).

A model fine-tuned on these descriptions hallucinates the partners like a real VLM; its answers to yes/no, colour
and counting questions (built from the ground truth, ``questions.py``) stay accurate, so it can act as its own
labeler (self-feedback).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muffin.world.questions import (
    DESCRIBE_PROMPTS,
    QA,
    colour_qa,
    count_qa,
    existence_qa,
    mention,
    name_of,
    place_qa,
)
from muffin.world.scenes import Scene
from muffin.world.shapes import COLOURS, PARTNER, place_phrase

OPENERS = ["The image shows", "The picture shows", "I can see"]
# The careless annotator's colour words: each key is named as its value (one-directional).
COLOUR_CONFUSIONS = {"orange": "red", "purple": "blue"}
# Each hallucination source and the CaptionConfig field that sets its rate.
SOURCES = {
    "partner": "hallucination_rate",
    "colour": "colour_confusion_rate",
    "count": "miscount_rate",
    "position": "place_error_rate",
}
SOURCE_RATES = tuple(SOURCES.values())


def mirror_cell(cell: int) -> int:
    """The cell a careless annotator names instead of ``cell``: left and right swapped; in the middle column top and
    bottom swapped; the centre is its own mirror (``place_error_rate`` never applies to it)."""
    row, col = divmod(cell, 3)
    return row * 3 + 2 - col if col != 1 else (2 - row) * 3 + col


@dataclass(frozen=True)
class CaptionConfig:
    """Rates of the annotator's habits (see the module docstring)."""

    hallucination_rate: float = 0.5
    synonym_rate: float = 0.1
    max_places: int = 2  # "There is a ... in the <place>." sentences per description (0..max_places)
    # The three sources beyond the planted partner; rates above 1/2 make greedy decoding of a base trained on the
    # descriptions repeat them (a greedy answer follows the more likely wording), so each is visible in its CHAIR-style
    # evaluation.
    colour_confusion_rate: float = 0.7
    miscount_rate: float = 0.7
    place_error_rate: float = 0.5

    def __post_init__(self) -> None:
        for name in SOURCE_RATES + ("synonym_rate",):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"CaptionConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}")


@dataclass
class Group:
    """Objects of one (class, colour) in a description; ``cells`` empty for a hallucinated group."""

    cls: str
    colour: str
    cells: list[int]
    hallucinated: bool = False

    @property
    def count(self) -> int:
        return max(1, len(self.cells))


DEFAULT_CAPTIONS = CaptionConfig()


def world_captions(world_dir: str | Path) -> CaptionConfig:
    """The caption config a world was built with (its manifest), so that labeler data and claim questions are drawn
    in the style of the base policy's training descriptions; the defaults for a world without one."""
    manifest = Path(world_dir) / "manifest.json"
    if not manifest.is_file():
        return CaptionConfig()
    saved = json.loads(manifest.read_text()).get("config", {}).get("captions", {})
    # a world built before the colour / count / position sources drew none of them
    return CaptionConfig(
        **{**dict.fromkeys(("colour_confusion_rate", "miscount_rate", "place_error_rate"), 0.0), **saved}
    )


def groups_of(scene: Scene) -> list[Group]:
    """(class, colour) groups of the scene in reading order of their first object."""
    groups: dict[tuple[str, str], Group] = {}
    for o in scene.objects:  # objects are sorted by cell
        groups.setdefault((o.cls, o.colour), Group(o.cls, o.colour, [])).cells.append(o.cell)
    return list(groups.values())


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class Description:
    """A drawn description: its ``text``, the absent classes it names (``hallucinated``) and, per source, how many
    errors the annotator made (``errors``) out of how many chances (``chances``: groups with a confusable colour,
    groups of two or more, place sentences off the centre; the partner's chance is a scene with an absent partner)."""

    text: str
    hallucinated: list[str]
    errors: dict[str, int]
    chances: dict[str, int]


def draw_description(
    scene: Scene, rng: random.Random, cfg: CaptionConfig = CaptionConfig(), *, faithful: bool = False
) -> Description:
    """A description of ``scene`` with the annotator's habits of ``cfg`` (none when ``faithful``).

    A source at rate 0 draws no random number, so a world built before that source existed is drawn unchanged.
    """
    groups = groups_of(scene)
    present = scene.classes()
    absent_partners = sorted({PARTNER[c] for c in present} - present)
    errors, chances = dict.fromkeys(SOURCES, 0), dict.fromkeys(SOURCES, 0)
    chances["partner"] = int(bool(absent_partners))
    if not faithful and absent_partners and rng.random() < cfg.hallucination_rate:
        fake = Group(rng.choice(absent_partners), rng.choice(list(COLOURS)), [], hallucinated=True)
        groups.insert(rng.randint(0, len(groups)), fake)
        errors["partner"] = 1
    said_colour = {id(g): g.colour for g in groups}
    said_count = {id(g): g.count for g in groups}
    for g in groups:
        if g.hallucinated:
            continue
        if g.colour in COLOUR_CONFUSIONS:
            chances["colour"] += 1
            if not faithful and cfg.colour_confusion_rate > 0 and rng.random() < cfg.colour_confusion_rate:
                said_colour[id(g)] = COLOUR_CONFUSIONS[g.colour]
                errors["colour"] += 1
        if g.count >= 2:
            chances["count"] += 1
            if not faithful and cfg.miscount_rate > 0 and rng.random() < cfg.miscount_rate:
                said_count[id(g)] = g.count + 1
                errors["count"] += 1
    names = {id(g): name_of(g.cls, rng, cfg.synonym_rate) for g in groups}
    listed = join_list([mention(said_count[id(g)], said_colour[id(g)], names[id(g)]) for g in groups])
    sentences = [f"{rng.choice(OPENERS)} {listed}."]
    singles = [g for g in groups if not g.hallucinated and len(g.cells) == 1]
    for g in rng.sample(singles, min(len(singles), rng.randint(0, cfg.max_places))):
        cell = g.cells[0]
        if cell != 4:
            chances["position"] += 1
            if not faithful and cfg.place_error_rate > 0 and rng.random() < cfg.place_error_rate:
                cell = mirror_cell(cell)
                errors["position"] += 1
        sentences.append(f"There is {mention(1, said_colour[id(g)], names[id(g)])} {place_phrase(cell)}.")
    return Description(" ".join(sentences), [g.cls for g in groups if g.hallucinated], errors, chances)


def describe(
    scene: Scene, rng: random.Random, cfg: CaptionConfig = CaptionConfig(), *, faithful: bool = False
) -> tuple[str, list[str]]:
    """A description of ``scene`` and the classes it names that are absent (``draw_description``'s text and
    ``hallucinated``)."""
    d = draw_description(scene, rng, cfg, faithful=faithful)
    return d.text, d.hallucinated


def sft_records(
    scene: Scene,
    image: str,
    rng: random.Random,
    cfg: CaptionConfig = CaptionConfig(),
    *,
    n_describe: int = 1,
    n_exist: int = 3,
    n_colour: int = 1,
    n_count: int = 1,
    n_where: int = 0,
) -> list[dict[str, Any]]:
    """Supervised examples for one training scene: descriptions (biased) and questions (true answers).

    Each record: ``id``, ``image_path``, ``image_id``, ``n_objects``, ``question``, ``answer``, ``kind`` and, for descriptions,
    ``hallucinated`` (the absent classes the description names).
    """
    recs: list[dict[str, Any]] = []

    def add(qa: QA | None, **extra: Any) -> None:
        if qa is not None:
            recs.append(
                {
                    "id": f"{scene.image_id}-{len(recs)}",
                    "image_path": image,
                    "image_id": scene.image_id,
                    "n_objects": len(scene.objects),
                    "question": qa.question,
                    "answer": qa.answer,
                    "kind": qa.kind,
                    **extra,
                }
            )

    for _ in range(n_describe):
        d = draw_description(scene, rng, cfg)
        add(
            QA(rng.choice(DESCRIBE_PROMPTS), d.text, "describe"),
            hallucinated=d.hallucinated,
            errors=d.errors,
            chances=d.chances,
        )
    for _ in range(n_exist):
        add(existence_qa(scene, rng, synonym_rate=cfg.synonym_rate))
    for _ in range(n_colour):
        add(colour_qa(scene, rng, synonym_rate=cfg.synonym_rate))
    for _ in range(n_count):
        add(count_qa(scene, rng, synonym_rate=cfg.synonym_rate))
    for _ in range(n_where):  # drawn last, so a world built without them is unchanged
        add(place_qa(scene, rng, synonym_rate=cfg.synonym_rate))
    return recs


def corpus_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured bias of a corpus: share of descriptions naming an absent object, of hallucinated mentions, and per
    source (``SOURCES``) the errors, the chances and their ratio, the rate the source was drawn at.

    The mention share counts each described (class, colour) group once, like CHAIR-i counts each mentioned object.
    """
    descs = [r for r in records if r["kind"] == "describe"]
    if not descs:
        return {"descriptions": 0}
    from muffin.world.questions import parse_mentions

    n_hall = sum(1 for r in descs if r["hallucinated"])
    mentions = sum(len({(m[1], m[2]) for m in parse_mentions(r["answer"].split(". ")[0])}) for r in descs)
    fake_mentions = sum(len(r["hallucinated"]) for r in descs)
    yes = [r for r in records if r["kind"] == "exist"]
    per_source = {}
    for source in SOURCES:  # errors per chance: the rate each source was drawn at, measured
        chances = sum(r.get("chances", {}).get(source, 0) for r in descs)
        errors = sum(r.get("errors", {}).get(source, 0) for r in descs)
        per_source[source] = {
            "errors": errors,
            "chances": chances,
            "rate": round(errors / chances, 4) if chances else None,
        }
    return {
        "descriptions": len(descs),
        "descriptions_with_hallucination": round(n_hall / len(descs), 4),
        "hallucinated_mention_share": round(fake_mentions / max(1, mentions), 4),
        "yes_share_of_exist_questions": round(sum(r["answer"].startswith("Yes") for r in yes) / max(1, len(yes)), 4),
        "sources": per_source,
    }
