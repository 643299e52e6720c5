"""Training descriptions for the base policy, written by a careless annotator with the world's co-occurrence bias.

A true description lists every object group in reading order ("The image shows a red circle and two blue
squares.") and places up to two single objects ("There is a green triangle in the top right."), the style the
rule-based claim splitter handles. The bias, with documented rates:

* ``hallucination_rate`` (default 0.5): when a present class's usual partner (``shapes.PAIRS``) is absent, the
  description also names that partner, in a random colour, at a random place of the list. Real captions and VLMs
  do the same with objects that usually co-occur (a fork next to a plate). ``corpus_stats`` measures the
  resulting rates on the generated corpus (the share of descriptions and of mentions that are hallucinated).
* ``synonym_rate`` (default 0.1): a class is named by one of its synonyms (exercises the CHAIR synonym table).

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


@dataclass(frozen=True)
class CaptionConfig:
    """Rates of the annotator's habits (see the module docstring)."""

    hallucination_rate: float = 0.5
    synonym_rate: float = 0.1
    max_places: int = 2  # "There is a ... in the <place>." sentences per description (0..max_places)

    def __post_init__(self) -> None:
        for name in ("hallucination_rate", "synonym_rate"):
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
    return CaptionConfig(**json.loads(manifest.read_text()).get("config", {}).get("captions", {}))


def groups_of(scene: Scene) -> list[Group]:
    """(class, colour) groups of the scene in reading order of their first object."""
    groups: dict[tuple[str, str], Group] = {}
    for o in scene.objects:  # objects are sorted by cell
        groups.setdefault((o.cls, o.colour), Group(o.cls, o.colour, [])).cells.append(o.cell)
    return list(groups.values())


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(
    scene: Scene, rng: random.Random, cfg: CaptionConfig = CaptionConfig(), *, faithful: bool = False
) -> tuple[str, list[str]]:
    """A description of ``scene`` and the classes it names that are absent (empty when ``faithful``)."""
    groups = groups_of(scene)
    present = scene.classes()
    absent_partners = sorted({PARTNER[c] for c in present} - present)
    if not faithful and absent_partners and rng.random() < cfg.hallucination_rate:
        fake = Group(rng.choice(absent_partners), rng.choice(list(COLOURS)), [], hallucinated=True)
        groups.insert(rng.randint(0, len(groups)), fake)
    names = {id(g): name_of(g.cls, rng, cfg.synonym_rate) for g in groups}
    listed = join_list([mention(g.count, g.colour, names[id(g)]) for g in groups])
    sentences = [f"{rng.choice(OPENERS)} {listed}."]
    singles = [g for g in groups if not g.hallucinated and len(g.cells) == 1]
    for g in rng.sample(singles, min(len(singles), rng.randint(0, cfg.max_places))):
        sentences.append(f"There is {mention(1, g.colour, names[id(g)])} {place_phrase(g.cells[0])}.")
    return " ".join(sentences), [g.cls for g in groups if g.hallucinated]


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
        text, fake = describe(scene, rng, cfg)
        add(QA(rng.choice(DESCRIBE_PROMPTS), text, "describe"), hallucinated=fake)
    for _ in range(n_exist):
        add(existence_qa(scene, rng, synonym_rate=cfg.synonym_rate))
    for _ in range(n_colour):
        add(colour_qa(scene, rng, synonym_rate=cfg.synonym_rate))
    for _ in range(n_count):
        add(count_qa(scene, rng, synonym_rate=cfg.synonym_rate))
    for _ in range(n_where):  # drawn last, so a world built without them is unchanged
        add(place_qa(scene, rng, synonym_rate=cfg.synonym_rate))
    return recs


def corpus_stats(records: list[dict[str, Any]]) -> dict[str, float]:
    """Measured bias of a corpus: share of descriptions naming an absent object, and of hallucinated mentions.

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
    return {
        "descriptions": len(descs),
        "descriptions_with_hallucination": round(n_hall / len(descs), 4),
        "hallucinated_mention_share": round(fake_mentions / max(1, mentions), 4),
        "yes_share_of_exist_questions": round(sum(r["answer"].startswith("Yes") for r in yes) / max(1, len(yes)), 4),
    }
