"""CHAIR: objects mentioned in an answer versus the objects in the image (Rohrbach et al. 2018, as Object HalBench).

Pure and generic: the classes and their surface forms come from a synonym table (one line per class,
``canonical, synonym, ...``; default: our table of the 80 COCO classes, ``eval/coco_synonyms.txt``), ground truth
from any COCO-format annotation file (instances; captions optional), mentions from the offline rule extractor
below or from a judge's list of object names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_SYNONYMS = Path(__file__).with_name("coco_synonyms.txt")

# Phrases that contain a class word but name no object of that class; consumed without a mention (COCO table).
COCO_STOP_PHRASES = (
    "baseball field",
    "baseball diamond",
    "baseball game",
    "baseball cap",
    "baseball uniform",
    "baseball team",
    "tennis court",
    "tennis match",
    "soccer field",
    "football field",
    "basketball court",
    "ski slope",
    "ski lift",
    "ski resort",
    "ski pole",
    "bus stop",
    "bus station",
    "train station",
    "train track",
    "railroad track",
    "mouse pad",
    "home plate",
    "dog park",
    "car park",
)
# Words that name a person on their own but only qualify the next object when followed by one
# ("baby elephant", "adult giraffe", "passenger train"), as in the original CHAIR's double-word rules.
COCO_MODIFIERS = ("baby", "adult", "passenger")

# plural:singular pairs the suffix rules get wrong
_IRREGULAR = dict(
    pair.split(":")
    for pair in (
        "people:person persons:person men:man women:woman children:child mice:mouse geese:goose "
        "teeth:tooth feet:foot oxen:ox knives:knife leaves:leaf wolves:wolf shelves:shelf halves:half "
        "calves:calf loaves:loaf skis:ski buses:bus busses:bus scissors:scissors benches:bench "
        "sandwiches:sandwich couches:couch watches:watch boxes:box dishes:dish brushes:brush "
        "toothbrushes:toothbrush dresses:dress lenses:lens ponies:pony puppies:puppy teddies:teddy "
        "cookies:cookie movies:movie pies:pie ties:tie bowties:bowtie lorries:lorry doggies:doggy "
        "tomatoes:tomato potatoes:potato heroes:hero mangoes:mango "
    ).split()
)
_INVARIANT = set(
    (
        "across always as bass bmx boss broccoli bus canvas cattle ceramics chassis christmas clothes "
        "cross deer dress fish gas glass grass has his is its jeans lens news pants physics scissors "
        "series sheep shorts species sunglasses suv tennis this tv us was yes "
    ).split()
)


def singularize(word: str) -> str:
    """Rule-based English singular of a lower-case noun (irregulars, -ies, -ves, -ches/-shes/-xes/-sses, -s)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _INVARIANT or len(word) <= 3 or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zzes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens; hyphens split words ("double-decker"), possessives are dropped ("dog's")."""
    text = re.sub(r"[-_/]", " ", text.lower())
    return [re.sub(r"'s?$", "", t) for t in re.findall(r"[a-z]+(?:'[a-z]*)?", text)]


@dataclass
class SynonymTable:
    """Classes and their surface forms; ``index`` maps singularised token tuples to the canonical class."""

    classes: list[str]
    index: dict[tuple[str, ...], str]
    source: str
    max_len: int = 1

    def lookup(self, name: str) -> str | None:
        """Canonical class of a whole name ("Dining Tables" -> "dining table"), or None."""
        return self.index.get(tuple(singularize(t) for t in tokenize(name)))


def load_synonyms(path: str | Path | None = None) -> SynonymTable:
    """Read a synonym table: one class per line, ``canonical, synonym, ...``; blank and ``#`` lines skipped.

    A surface form listed under two different classes is an error (which class would a mention count for?).
    """
    path = Path(path) if path is not None else DEFAULT_SYNONYMS
    if not path.is_file():
        raise FileNotFoundError(
            f"synonym table '{path}' does not exist; pass a file with one line per class "
            "('canonical, synonym, ...') or leave the option out for the COCO table"
        )
    classes: list[str] = []
    index: dict[tuple[str, ...], str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        names = [s.strip() for s in line.split(",") if s.strip()]
        canonical = names[0]
        classes.append(canonical)
        for name in names:
            key = tuple(singularize(t) for t in tokenize(name))
            if not key:
                continue
            if index.get(key, canonical) != canonical:
                raise ValueError(
                    f"{path}:{n}: '{name}' is listed for both '{index[key]}' and '{canonical}'; "
                    "a surface form must belong to one class, remove it from one line"
                )
            index[key] = canonical
    if not classes:
        raise ValueError(f"synonym table '{path}' holds no classes")
    return SynonymTable(classes, index, str(path), max(len(k) for k in index))


@dataclass(frozen=True)
class Mention:
    """One object mention: the surface text, its class and its first token's position."""

    surface: str
    cls: str
    position: int = 0


@dataclass
class RuleExtractor:
    """Offline mention extraction: tokenise, singularise, longest match of multi-word names, synonym lookup."""

    table: SynonymTable
    stop_phrases: Sequence[str] = ()
    modifiers: Sequence[str] = ()
    _stops: set[tuple[str, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._stops = {tuple(singularize(t) for t in tokenize(p)) for p in self.stop_phrases}

    @classmethod
    def for_table(cls, table: SynonymTable, *, coco_rules: bool) -> RuleExtractor:
        """An extractor with the COCO stop phrases and modifiers when ``coco_rules`` (our COCO table), else none."""
        if coco_rules:
            return cls(table, COCO_STOP_PHRASES, COCO_MODIFIERS)
        return cls(table)

    def mentions(self, text: str) -> list[Mention]:
        """Every object mention in ``text``, in order (repeats included)."""
        words = [singularize(t) for t in tokenize(text)]
        longest = max(self.table.max_len, max((len(s) for s in self._stops), default=1))
        found: list[tuple[int, int, str | None]] = []
        i = 0
        while i < len(words):
            for n in range(min(longest, len(words) - i), 0, -1):
                phrase = tuple(words[i : i + n])
                if phrase in self._stops:
                    found.append((i, i + n, None))
                    break
                if phrase in self.table.index:
                    found.append((i, i + n, self.table.index[phrase]))
                    break
            else:
                i += 1
                continue
            i = found[-1][1]
        out = []
        for k, (start, end, cls) in enumerate(found):
            if cls is None:
                continue
            surface = " ".join(words[start:end])
            nxt = found[k + 1] if k + 1 < len(found) else None
            if surface in self.modifiers and nxt is not None and nxt[0] == end and nxt[2] not in (None, cls):
                continue  # "baby elephant": the elephant, not a baby
            out.append(Mention(surface, cls, start))
        return out

    def classes_of_names(self, names: Iterable[str]) -> list[Mention]:
        """Mentions of a judge's object names: each name mapped whole, else by the words inside it."""
        out = []
        for name in names:
            whole = self.table.lookup(name)
            if whole is not None:
                out.append(Mention(" ".join(singularize(t) for t in tokenize(name)), whole))
            else:
                out.extend(self.mentions(name))
        return out


def unique_mentions(mentions: Iterable[Mention]) -> list[tuple[str, str]]:
    """Distinct (surface, class) pairs in first-seen order: "a dog ... the dog" is one mention of dog."""
    seen: dict[tuple[str, str], None] = {}
    for m in mentions:
        seen.setdefault((m.surface, m.cls), None)
    return list(seen)


def sample_detail(mentions: Sequence[tuple[str, str]], gt: set[str], n_words: int) -> dict[str, Any]:
    """Per-answer CHAIR detail: which mentions are hallucinated, which ground-truth classes were recalled."""
    hallucinated = [[s, c] for s, c in mentions if c not in gt]
    correct = sorted({c for _, c in mentions if c in gt})
    return {
        "mentions": [[s, c] for s, c in mentions],
        "hallucinated": hallucinated,
        "correct_objects": correct,
        "gt_objects": sorted(gt),
        "n_words": n_words,
        "chair_s": int(bool(hallucinated)),
        "chair_i": len(hallucinated) / len(mentions) if mentions else 0.0,
    }


def chair_summary(details: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
    """Corpus metrics from ``sample_detail`` records.

    - ``chair_s``: answers with any hallucinated object / all answers.
    - ``response_hallucination``: answers with any hallucinated object / answers that mention at least one
      object (the "response-level" number the RLAIF-V paper reports for Object HalBench).
    - ``chair_i``: hallucinated mentions / all mentions (the paper's "mention-level" number).
    - ``recall``: sum of recalled ground-truth classes / sum of ground-truth classes (micro, as the original).
    - ``mean_length``: mean number of whitespace-separated words per answer.

    A ratio whose denominator is zero (no answers, no mentions, no ground truth) is None, not 0.
    """
    n = len(details)
    with_mentions = [d for d in details if d["mentions"]]
    n_hall = sum(d["chair_s"] for d in details)
    mentions = sum(len(d["mentions"]) for d in details)
    hallucinated = sum(len(d["hallucinated"]) for d in details)
    gt = sum(len(d["gt_objects"]) for d in details)
    recalled = sum(len(d["correct_objects"]) for d in details)
    return {
        "chair_s": n_hall / n if n else None,
        "response_hallucination": n_hall / len(with_mentions) if with_mentions else None,
        "chair_i": hallucinated / mentions if mentions else None,
        "recall": recalled / gt if gt else None,
        "mean_length": sum(d["n_words"] for d in details) / n if n else None,
        "n_answers": n,
        "n_answers_with_mentions": len(with_mentions),
        "n_mentions": mentions,
        "n_hallucinated_mentions": hallucinated,
    }


def load_ground_truth(
    instances: Sequence[str | Path],
    table: SynonymTable,
    *,
    captions: Sequence[str | Path] = (),
    extractor: RuleExtractor | None = None,
    image_ids: Iterable[int] | None = None,
) -> dict[int, set[str]]:
    """Ground-truth classes per image id from COCO-format files, read with ``pycocotools``.

    Instance categories are mapped through the synonym table (a category missing from it stays its own class,
    with a warning); objects named in the optional caption files are added, extracted with ``extractor`` (as
    the original CHAIR does). Only images listed in an instances file are returned: an answer about any other
    image id cannot be scored.
    """
    from pycocotools.coco import COCO

    wanted = None if image_ids is None else set(image_ids)
    truth: dict[int, set[str]] = {}
    for path in instances:
        coco = _load_coco(COCO, path)
        names = {}
        for cat in coco.loadCats(coco.getCatIds()):
            names[cat["id"]] = table.lookup(cat["name"]) or cat["name"]
            if table.lookup(cat["name"]) is None:
                logger.warning(
                    "category '%s' of %s is not in the synonym table %s; it is its own class",
                    cat["name"],
                    path,
                    table.source,
                )
        for img_id in coco.getImgIds():
            if wanted is not None and img_id not in wanted:
                continue
            objs = truth.setdefault(img_id, set())
            objs.update(names[a["category_id"]] for a in coco.imgToAnns.get(img_id, []))
    if captions:
        extractor = extractor or RuleExtractor(table)
        for path in captions:
            coco = _load_coco(COCO, path)
            for img_id, anns in coco.imgToAnns.items():
                if img_id in truth:
                    for a in anns:
                        truth[img_id].update(m.cls for m in extractor.mentions(a.get("caption", "")))
    return truth


def _load_coco(coco_cls: type, path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file '{path}' does not exist; pass instances_*.json / "
            "captions_*.json of COCO 2014 (or any COCO-format file)"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        return coco_cls(str(path))
