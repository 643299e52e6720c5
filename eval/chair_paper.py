"""CHAIR exactly as the published Object HalBench script counts it (RLAIF-V ``eval/eval_gpt_obj_halbench.py`` and
``summarize_gpt_obj_halbench_review.py``): its synonym table read as-is, NLTK lemmas of captions, spaCy noun runs
of the judge's objects, its two-word table, distinct-string mentions, ``split(" ")`` lengths and its metrics.
Words come from ``eval.nlp`` (NLTK / spaCy when installed, else the offline equivalent it records).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval import nlp

# Two-word rules the published script adds to the table's own multi-word names (its CHAIR.__init__).
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
VEHICLE_WORDS = ("jet", "train")
EXTRA_DOUBLE_WORDS = ("home plate", "train track")  # consumed as a unit, mapped to themselves: no class
SHORT_ANSWER_WORDS = 3  # answers of at most 3 words (``split()``) get no judge call and no objects


def strip_answer(text: str) -> str:
    """The answer as the published loader keeps it: "Assistant:" removed, surrounding whitespace stripped."""
    return text.replace("Assistant:", "").strip()


def answer_length(text: str) -> int:
    """Words of an answer as the published script counts them: ``len(answer.strip().split(" "))`` (so double
    spaces and newlines count differently from ``split()``)."""
    return len(strip_answer(text).strip().split(" "))


@dataclass
class PaperChair:
    """The published CHAIR evaluator's tables: every surface form, surface form -> class, two-word rules."""

    surface_forms: set[str]
    classes: dict[str, str]
    double_words: dict[str, str]
    source: str

    @classmethod
    def from_table(cls, path: str | Path) -> PaperChair:
        """Read a table like the published ``synonyms_refine.txt``: lines split on ", ", the first name is the
        class; a name listed twice belongs to the later line (the published dict is overwritten)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"synonym table '{path}' does not exist; the paper protocol needs the published table "
                "(fetch it with `python -m utils.fetch objhal-synonyms`) passed as --synonyms"
            )
        forms: set[str] = set()
        classes: dict[str, str] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            names = [s.strip() for s in line.strip().split(", ")]
            forms.update(names)
            for s in names:
                classes[s] = names[0]
        double = {w: w for w in classes if len(w.strip().split(" ")) >= 2}
        double.update({w: w for w in EXTRA_DOUBLE_WORDS})
        for animal in ANIMAL_WORDS:
            double[f"baby {animal}"] = animal
            double[f"adult {animal}"] = animal
        for vehicle in VEHICLE_WORDS:
            double[f"passenger {vehicle}"] = vehicle
        double.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
        return cls(forms, classes, double, str(path))

    def _merge_pairs(self, words: Sequence[str], keep_singles: bool) -> list[str]:
        out, i = [], 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            if pair in self.double_words:
                out.append(self.double_words[pair])
                i += 2
            else:
                if keep_singles:
                    out.append(words[i])
                i += 1
        return out

    def coco_words(self, words: Sequence[str]) -> list[tuple[str, str]]:
        """(word, class) of every word that is a surface form; "seat" is dropped when "toilet" is there too."""
        if "toilet" in words and "seat" in words:
            words = [w for w in words if w != "seat"]
        return [(w, self.classes[w]) for w in words if w in self.surface_forms]

    def caption_mentions(self, caption: str) -> list[tuple[str, str]]:
        """Mentions in free text (ground-truth captions; answers without a judge): lower-case, NLTK word tokens,
        WordNet noun lemmas, two-word rules, table lookup. Repeats are kept."""
        lemmas = [nlp.lemmatize(w) for w in nlp.word_tokenize(caption.lower())]
        return self.coco_words(self._merge_pairs(lemmas, keep_singles=True))

    def judge_object_words(self, objects: Iterable[Any]) -> list[str]:
        """The published ``get_pred_objs_match``: each judge object is tagged as "a {object}"; a two-word rule
        on its lemmas wins, else each run of noun tags becomes one word (its lemmas joined); distinct strings in
        first-seen order."""
        out: list[str] = []
        for obj in objects:
            tokens = nlp.tag_phrase(f"a {obj}")
            found = self._merge_pairs([t.lemma for t in tokens], keep_singles=False)
            if not found:
                found, run = [], ""
                for t in tokens:
                    if t.tag in nlp.NOUN_TAGS:
                        run += f" {t.lemma}"
                    elif run:
                        found.append(run.strip())
                        run = ""
                if run:
                    found.append(run.strip())
            out += found
        return list(dict.fromkeys(out))

    def ground_truth(
        self,
        instances: Sequence[str | Path],
        captions: Sequence[str | Path],
        image_ids: Iterable[int],
    ) -> dict[int, set[str]]:
        """Classes per image: instance categories through the table, plus caption mentions (the published script
        reads train and val 2014 of both kinds)."""
        truth: dict[int, set[str]] = {i: set() for i in image_ids}
        for path in instances:
            data = _load_json(path)
            names = {c["id"]: c["name"] for c in data["categories"]}
            missing = sorted(n for n in names.values() if n not in self.classes)
            if missing:
                raise ValueError(
                    f"categories {missing} of {path} are not in the synonym table {self.source}; "
                    "pass the published table or add a line per category"
                )
            for a in data["annotations"]:
                if a["image_id"] in truth:
                    truth[a["image_id"]].add(self.classes[names[a["category_id"]]])
        for path in captions:
            for a in _load_json(path)["annotations"]:
                if a["image_id"] in truth:
                    truth[a["image_id"]].update(c for _, c in self.caption_mentions(a["caption"]))
        return truth


def _load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file '{path}' does not exist; pass instances_{{train,val}}2014.json (and "
            "captions_{train,val}2014.json) of COCO 2014"
        )
    with contextlib.redirect_stdout(io.StringIO()), open(path, encoding="utf-8") as f:
        return json.load(f)


def paper_detail(mentions: Sequence[tuple[str, str]], gt: set[str], answer: str) -> dict[str, Any]:
    """Per-answer record of the published ``compute_chair``: every (word, class) counts, hallucinated when the
    class is not in the ground truth."""
    hallucinated = [[w, c] for w, c in mentions if c not in gt]
    return {
        "mentions": [[w, c] for w, c in mentions],
        "hallucinated": hallucinated,
        "correct_objects": sorted({c for _, c in mentions if c in gt}),
        "gt_objects": sorted(gt),
        "n_words": answer_length(answer),
        "CHAIRs": int(bool(hallucinated)),
        "CHAIRi": len(hallucinated) / len(mentions) if mentions else 0.0,
    }


def paper_summary(details: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The published ``overall_metrics`` and the summarizer's percentages.

    ``response_hall`` (the paper's "response-level" number) = ``CHAIRs_refine`` x 100: answers with a
    hallucinated object over answers with at least one COCO object. ``object_hall`` (the "mention-level" number)
    = ``CHAIRi`` x 100. A ratio with a zero denominator is None (the published script raises there).
    """
    n = len(details)
    coco = sum(1 for d in details if d["mentions"])
    hall = sum(d["CHAIRs"] for d in details)
    words = sum(len(d["mentions"]) for d in details)
    hall_words = sum(len(d["hallucinated"]) for d in details)
    gt = sum(len(d["gt_objects"]) for d in details)
    recalled = sum(len(d["correct_objects"]) for d in details)

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    m: dict[str, Any] = {
        "CHAIRs": ratio(hall, n),
        "CHAIRs_refine": ratio(hall, coco),
        "CHAIRi": ratio(hall_words, words),
        "obj_rec": ratio(recalled, gt),
        "sentence_num": n,
        "coco_sentence_num": coco,
        "coco_word_count": recalled,  # the published key: recalled ground-truth classes, not mentions
        "gt_word_count": gt,
        "avg_word_len": ratio(sum(d["n_words"] for d in details), n),
    }
    m["correct_rate"] = None if m["CHAIRs_refine"] is None else 1 - m["CHAIRs_refine"]
    m["object_correct_rate"] = None if m["CHAIRi"] is None else 1 - m["CHAIRi"]
    pct = {k: None if m[s] is None else 100 * m[s] for k, s in _SUMMARY.items()}
    return {**m, **pct, "n_mentions": words, "n_hallucinated_mentions": hall_words}


# summarizer row -> overall_metrics key it prints x 100
_SUMMARY = {
    "response_hall": "CHAIRs_refine",
    "object_hall": "CHAIRi",
    "response_correct": "correct_rate",
    "object_correct": "object_correct_rate",
    "object_recall": "obj_rec",
}


def format_paper_summary(m: dict[str, Any]) -> str:
    """The summarizer's printout (``summarize_gpt_obj_halbench_review.py``), two decimals."""

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    return (
        f"Response Hall   : {f(m['response_hall'])}\n"
        f"Object Hall     : {f(m['object_hall'])}\n\n"
        f"Response Correct: {f(m['response_correct'])}\n"
        f"Object Correct  : {f(m['object_correct'])}\n"
        f"Object Recall   : {f(m['object_recall'])}\n"
        f"Average Length  : {f(m['avg_word_len'])}\n"
        f"COCO Sent Number: {m['coco_sentence_num']}\n"
        f"COCO Word Number: {m['coco_word_count']}\n"
        f"GT Word Number  : {m['gt_word_count']}"
    )
