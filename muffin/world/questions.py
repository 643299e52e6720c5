"""Questions about a scene in several phrasings, their true answers, and an oracle that checks world claims.

Four kinds: detailed description prompts, yes/no existence (with colour, count or position), colour and counting
questions. ``oracle_truth(scene, text)`` reads a claim or yes/no question of this world ("There are two blue
squares.", "Is there a green triangle in the top right?") and says whether it is true of the scene: it is the
ground truth the labeler's accuracy is measured against, and the oracle feedback of the comparison runs.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from muffin.world.scenes import Scene
from muffin.world.shapes import (
    CELL_NAMES,
    CLASSES,
    COLOURS,
    NUMBER_WORDS,
    PARTNER,
    SYNONYMS,
    number_word,
    place_phrase,
    plural,
)

DESCRIBE_PROMPTS = [
    "Describe the image in detail.",
    "What do you see in this image?",
    "Give a detailed description of the picture.",
    "What is in the image?",
    "Describe this picture.",
    "Tell me what the image shows.",
]


@dataclass
class QA:
    """One question with its true answer; ``kind`` is describe / exist / colour / count; ``truth`` for yes/no."""

    question: str
    answer: str
    kind: str
    truth: bool | None = None


def name_of(cls: str, rng: random.Random, synonym_rate: float) -> str:
    """The class name, or one of its synonyms with probability ``synonym_rate``."""
    return rng.choice(SYNONYMS[cls]) if rng.random() < synonym_rate else cls


def mention(count: int, colour: str | None, name: str) -> str:
    """ "a red star", "two blue squares", "an orange arrow", "a tree"."""
    words = ([colour] if colour else []) + [name if count == 1 else plural(name)]
    head = " ".join(words)
    if count == 1:
        return ("an " if head[0] in "aeiou" else "a ") + head
    return f"{number_word(count)} {head}"


def count_of(scene: Scene, cls: str, colour: str | None = None, cell: int | None = None) -> int:
    return sum(
        1
        for o in scene.objects
        if o.cls == cls and (colour is None or o.colour == colour) and (cell is None or o.cell == cell)
    )


# Phrasings of yes/no existence questions: ours, and what the rule-based change-question backend makes of the
# world's descriptions ("The image shows two blue squares." -> "Does the image show two blue squares?").
EXIST_TEMPLATES = [
    "Is there {m} in the image?",
    "Does the image show {m}?",
    "Does the picture show {m}?",
    "Can I see {m}?",
    "Can you see {m} in the image?",
]
EXIST_PLURAL_TEMPLATES = [
    "Are there {m} in the image?",
    "Does the image show {m}?",
    "Does the picture show {m}?",
    "Can I see {m}?",
]
PLACE_TEMPLATES = ["Is there {m} {place} in the image?", "Is there {m} {place}?"]


def existence_question(count: int, colour: str | None, name: str, where: str | None, rng: random.Random) -> str:
    """A yes/no question asking whether the scene holds ``count`` [``colour``] ``name`` [at ``where``]."""
    m = mention(count, colour, name)
    if where:
        return rng.choice(PLACE_TEMPLATES).format(m=m, place=place_phrase(CELL_NAMES.index(where)))
    return rng.choice(EXIST_TEMPLATES if count == 1 else EXIST_PLURAL_TEMPLATES).format(m=m)


def existence_qa(scene: Scene, rng: random.Random, *, synonym_rate: float = 0.0) -> QA:
    """A yes/no question, true or false with probability 1/2; false ones are mostly the world's hard negatives.

    Negatives: the absent usual partner of a present class (what the biased captions hallucinate), a present class
    in a colour it does not have, a wrong count, a wrong position, or any absent class.
    """
    obj = rng.choice(scene.objects)
    want_true = rng.random() < 0.5
    variant = rng.choice(["colour", "colour", "plain", "count", "position"])
    cls, colour, count, where = obj.cls, obj.colour, 1, None
    if variant == "plain":
        colour = None
    elif variant == "count":
        count = count_of(scene, cls, colour)
    elif variant == "position":
        where = CELL_NAMES[obj.cell]
    if not want_true:
        cls, colour, count, where = _negative(scene, rng, cls, colour, count, where)
    truth = oracle_claim(scene, count, colour, cls, where)
    q = existence_question(count, colour, name_of(cls, rng, synonym_rate), where, rng)
    # A bare "Yes"/"No": the labeler's read-out compares the first answer token's P(yes) and P(no), and a word-level
    # tokenizer would make "Yes," a token of its own that the read-out never looks at.
    answer = "Yes" if truth else "No"
    return QA(q, answer, "exist", truth)


def _negative(
    scene: Scene, rng: random.Random, cls: str, colour: str | None, count: int, where: str | None
) -> tuple[str, str | None, int, str | None]:
    # Every negative keeps the question's form (count and position): when a form's answer leans one way (measured:
    # position questions 63% "Yes" before this), a tiny model answers from the form and ignores the image.
    present = scene.classes()
    partners = sorted({PARTNER[c] for c in present} - present)
    roll = rng.random()
    if partners and roll < 0.4:
        return rng.choice(partners), (rng.choice(list(COLOURS)) if colour else None), count, where
    if colour and roll < 0.6:
        others = [c for c in COLOURS if count_of(scene, cls, c) == 0]
        if others:
            return cls, rng.choice(others), 1, where
    if count > 1 and roll < 0.7:
        return cls, colour, rng.choice([c for c in (2, 3, 4) if c != count]), None
    if where and roll < 0.8:
        free = [n for i, n in enumerate(CELL_NAMES) if count_of(scene, cls, cell=i) == 0]
        return cls, colour, 1, rng.choice(free)
    absent = [c for c in CLASSES if c not in present]
    return rng.choice(absent), (rng.choice(list(COLOURS)) if colour else None), count, where


def colour_qa(scene: Scene, rng: random.Random, *, synonym_rate: float = 0.0) -> QA | None:
    """ "What colour is the star?" for a class present exactly once (None when no class is)."""
    singles = [o for o in scene.objects if count_of(scene, o.cls) == 1]
    if not singles:
        return None
    obj = rng.choice(singles)
    name = name_of(obj.cls, rng, synonym_rate)
    q = rng.choice([f"What colour is the {name}?", f"What is the colour of the {name}?"])
    return QA(q, f"The {name} is {obj.colour}.", "colour")


def place_qa(scene: Scene, rng: random.Random, *, synonym_rate: float = 0.0) -> QA | None:
    """ "Where is the red star?" for an object whose class and colour are unique in the scene (None when none is):
    a direct lesson in where things are, which the descriptions' place sentences teach too sparsely (see
    ``CaptionConfig`` / ``build --n-where``)."""
    singles = [o for o in scene.objects if count_of(scene, o.cls, o.colour) == 1]
    if not singles:
        return None
    obj = rng.choice(singles)
    name = name_of(obj.cls, rng, synonym_rate)
    q = rng.choice([f"Where is the {obj.colour} {name}?", f"Where is the {obj.colour} {name} in the image?"])
    return QA(q, f"The {obj.colour} {name} is {place_phrase(obj.cell)}.", "where")


def count_qa(scene: Scene, rng: random.Random, *, synonym_rate: float = 0.0) -> QA:
    """ "How many stars are there?" about a present class (3 in 4) or an absent one."""
    cls = rng.choice(sorted(scene.classes())) if rng.random() < 0.75 else rng.choice(CLASSES)
    name = name_of(cls, rng, synonym_rate)
    n = count_of(scene, cls)
    q = rng.choice([f"How many {plural(name)} are there in the image?", f"How many {plural(name)} can you see?"])
    if n == 0:
        return QA(q, f"There are no {plural(name)}.", "count")
    return QA(q, f"There {'is' if n == 1 else 'are'} {mention(n, None, name)}.", "count")


# ------------------------------------------------------------------------------------------- POPE questions
POPE_STRATEGIES = ("random", "popular", "adversarial")


def pope_records(scenes: Sequence[Scene], strategy: str, *, per_scene: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """POPE's question file for ``scenes`` (AoiDragon/POPE ``utils.pope``): per scene, each of its first
    ``per_scene`` classes in reading order gives a "yes" question, followed by a "no" question about a class the
    scene lacks and has not been asked about, chosen by ``strategy``: ``random`` (any class), ``popular`` (the
    classes in most of these scenes first) or ``adversarial`` (the classes seen most often with the asked class
    first: here the world's co-occurring partner). Records: ``question_id`` (from 1), ``image`` (relative to the
    world directory), ``text`` ("Is there a star in the image?"), ``label``.
    """
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"unknown POPE strategy '{strategy}'. Available: {', '.join(POPE_STRATEGIES)}")
    rng = random.Random(f"pope:{seed}:{strategy}")
    frequency = Counter(c for sc in scenes for c in sc.classes())
    popular = sorted(CLASSES, key=lambda c: (-frequency[c], CLASSES.index(c)))
    together: dict[str, Counter[str]] = {c: Counter() for c in CLASSES}
    for sc in scenes:
        for a in sc.classes():
            together[a].update(b for b in sc.classes() if b != a)
    out: list[dict[str, Any]] = []
    for sc in scenes:
        present = list(dict.fromkeys(o.cls for o in sc.objects))[:per_scene]
        asked = list(present)
        for cls in present:
            out.append(_pope_row(len(out) + 1, sc, cls, "yes"))
            free = [c for c in CLASSES if c not in asked and c not in sc.classes()]
            if not free:
                continue  # every class asked already: no negative left (POPE's images never run out)
            if strategy == "random":
                neg = rng.choice(free)
            else:
                ranked = (
                    popular
                    if strategy == "popular"
                    else sorted(together[cls], key=lambda c: (-together[cls][c], CLASSES.index(c)))
                )
                neg = next((c for c in ranked if c in free), None) or rng.choice(free)
            asked.append(neg)
            out.append(_pope_row(len(out) + 1, sc, neg, "no"))
    return out


def _pope_row(qid: int, scene: Scene, cls: str, label: str) -> dict[str, Any]:
    article = "an" if cls[0] in "aeiou" else "a"
    image = f"{scene.split}/images/{scene.file_name}"  # as muffin.world.build.image_path
    return {"question_id": qid, "image": image, "text": f"Is there {article} {cls} in the image?", "label": label}


# ----------------------------------------------------------------------------------------------- the oracle
_SURFACE = {
    form: cls for cls in CLASSES for form in [cls, plural(cls)] + SYNONYMS[cls] + [plural(s) for s in SYNONYMS[cls]]
}
_NAME = "|".join(sorted(map(re.escape, _SURFACE), key=len, reverse=True))
_COLOUR = "|".join(COLOURS)
_COUNT = "|".join(["a", "an", "one"] + NUMBER_WORDS[2:] + [str(i) for i in range(2, 10)])
_POS = "|".join(sorted(CELL_NAMES, key=len, reverse=True))
MENTION_RE = re.compile(
    rf"\b(?P<count>{_COUNT})\s+(?:(?P<colour>{_COLOUR})\s+)?(?P<name>{_NAME})\b(?:\s+(?:in|at|on)\s+the\s+(?P<where>{_POS})\b)?",
    re.IGNORECASE,
)


def oracle_claim(scene: Scene, count: int, colour: str | None, cls: str, where: str | None) -> bool:
    """Truth of "there is/are <count> [<colour>] <cls> [in the <where>]": counts are exact, a position is a cell."""
    if where is not None:
        return count_of(scene, cls, colour, CELL_NAMES.index(where)) >= 1 and count == 1
    n = count_of(scene, cls, colour)
    return n >= 1 if count == 1 else n == count


def parse_mentions(text: str) -> list[tuple[int, str | None, str, str | None]]:
    """All object mentions in ``text`` as (count, colour or None, class, position or None)."""
    out = []
    for m in MENTION_RE.finditer(text):
        word = m.group("count").lower()
        count = 1 if word in ("a", "an", "one") else (NUMBER_WORDS.index(word) if word in NUMBER_WORDS else int(word))
        colour = m.group("colour").lower() if m.group("colour") else None
        where = m.group("where").lower() if m.group("where") else None
        out.append((count, colour, _SURFACE[m.group("name").lower()], where))
    return out


def oracle_truth(scene: Scene, text: str) -> bool | None:
    """Whether every object mention of a claim or yes/no question holds in ``scene``; None if it mentions none.

    A negated claim ("there is no moon") is true when the object is absent.
    """
    mentions = parse_mentions(text)
    if not mentions:
        neg = re.search(rf"\bno\s+(?:(?P<colour>{_COLOUR})\s+)?(?P<name>{_NAME})\b", text, re.IGNORECASE)
        if neg:
            colour = neg.group("colour").lower() if neg.group("colour") else None
            return count_of(scene, _SURFACE[neg.group("name").lower()], colour) == 0
        return None
    return all(oracle_claim(scene, *m) for m in mentions)
