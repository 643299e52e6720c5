"""The word processing AMBER's official scorer runs, as two explicit backends: "official" (NLTK's tokenizer, tagger
and WordNet lemmatizer, spaCy ``en_core_web_lg`` similarity) and "offline" (no model data; see docs/AMBER_POPE.md
for how it differs). ``build_nlp("auto")`` takes the official one when everything it needs is installed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection
from typing import Any, Protocol

logger = logging.getLogger(__name__)

SIMILARITY_THRESHOLD = 0.8  # inference.py --similarity_score default
SPACY_MODEL = "en_core_web_lg"  # the model inference.py loads
OFFICIAL_INSTALL = (
    "pip install nltk spacy && python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet "
    "&& python -m spacy download en_core_web_lg"
)

# Offline noun test (stands in for nltk.pos_tag's NN* tags on AMBER's object words only): a word right after one
# of these is read as a verb ("to ski", "they ski", "can ski")...
VERB_CONTEXT = frozenset("to can could will would shall should may might must i you we they he she who n't".split())
# ...the word "can" is a noun only right after one of these ("a can"; not "that can be seen")...
CAN_DETERMINERS = frozenset("a an the each every another his her its their my your our".split())
# ...and a singular "-ing" word ("building", "painting", "sailing") is a verb right after a form of "be" or a
# word that usually is its subject in a description ("is sailing", "people sailing"; "an oil painting" stays a noun).
ING_VERB_CONTEXT = frozenset(
    "is are was were be been being am 's 're while and people man men woman women person boy girl child children".split()
)

# A word right before a colour word modifies it ("light blue", "orange red"): not a noun.
COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple violet pink brown beige grey gray black white silver gold golden".split()
)


class AmberNLP(Protocol):
    """What the AMBER scorer needs from word processing."""

    name: str  # "official" or "offline": recorded with every number

    def nouns(self, text: str, vocabulary: Collection[str]) -> list[str]:
        """The lemmatised nouns of ``text`` that are in ``vocabulary``, in order, repeats kept."""
        ...

    def similar(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` count as the same object (official: spaCy similarity above the threshold)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The resources and versions behind the words, for results.json."""
        ...


class SpacySimilarity:
    """inference.py's ``check_synonyms_word``: ``nlp(word1).similarity(nlp(word2)) > threshold`` with a spaCy
    pipeline (``en_core_web_lg`` officially). spaCy scores identical words 1.0 and a word without a vector 0.

    Memoised: the official script reruns the pipeline for every pair, over AMBER's few hundred words.
    """

    def __init__(self, nlp: Any, threshold: float = SIMILARITY_THRESHOLD) -> None:
        self.nlp = nlp
        self.threshold = threshold
        self._docs: dict[str, Any] = {}
        self._similar: dict[tuple[str, str], bool] = {}

    def __call__(self, a: str, b: str) -> bool:
        key = (a, b)
        if key not in self._similar:
            with warnings.catch_warnings():  # W008 "empty vectors", silenced as inference.py silences it
                warnings.simplefilter("ignore", UserWarning)
                self._similar[key] = self._doc(a).similarity(self._doc(b)) > self.threshold
        return self._similar[key]

    def _doc(self, word: str) -> Any:
        if word not in self._docs:
            self._docs[word] = self.nlp(word)
        return self._docs[word]


class OfficialNLP:
    """inference.py's ``extract_nouns`` and ``check_synonyms_word``, run through NLTK and spaCy themselves.

    Raises ``RuntimeError`` naming the install command when NLTK's data or the spaCy model is missing.
    """

    name = "official"

    def __init__(self, threshold: float = SIMILARITY_THRESHOLD, spacy_model: str = SPACY_MODEL) -> None:
        try:
            import nltk
            import spacy
            from nltk.stem import WordNetLemmatizer

            nltk.pos_tag(nltk.word_tokenize("A dog sits on the grass."))  # fails now, not mid-run, without data
            self._lemmatizer = WordNetLemmatizer()
            self._lemmatizer.lemmatize("dogs")
            pipeline = spacy.load(spacy_model)
        except (ImportError, LookupError, OSError) as e:
            raise RuntimeError(
                f"the official AMBER word processing is not installed ({e}); run: {OFFICIAL_INSTALL}"
            ) from e
        self._nltk = nltk
        self.similar = SpacySimilarity(pipeline, threshold)
        self.spacy_model = spacy_model

    def nouns(self, text: str, vocabulary: Collection[str]) -> list[str]:
        tagged = self._nltk.pos_tag(self._nltk.word_tokenize(text))
        lemmas = [self._lemmatizer.lemmatize(word) for word, pos in tagged if pos.startswith("NN")]
        return [w for w in lemmas if w in vocabulary]

    def describe(self) -> dict[str, Any]:
        version = self.similar.nlp.meta.get("version")
        return {
            "backend": self.name,
            "tokenizer": "nltk.word_tokenize",
            "tagger": "nltk.pos_tag (averaged perceptron)",
            "lemmatizer": "nltk WordNetLemmatizer",
            "similarity": f"spacy {self.spacy_model} {version} > {self.similar.threshold}",
            "versions": _versions(),
        }


class OfflineNLP:
    """No model data: NLTK's rule-based word tokenizer and a WordNet lemmatizer (``eval.nlp``), a context rule in
    place of the tagger, and exact equality in place of vector similarity.

    Exact equality is the one case spaCy also scores 1.0, so every pair it calls similar the official scorer
    does too: with the same nouns, CHAIR and Hal come out at or above the official values and Cover and Cog at or
    below them.
    """

    name = "offline"

    def __init__(self) -> None:
        from eval import nlp

        nlp.available_backend()  # raises with the install hint when no WordNet tables exist
        nlp.word_tokenize("a dog.")
        self._nlp = nlp

    def nouns(self, text: str, vocabulary: Collection[str]) -> list[str]:
        tokens = self._nlp.word_tokenize(text)
        out = []
        for i, tok in enumerate(tokens):
            lemma = self._nlp.lemmatize(tok)
            if lemma in vocabulary and is_noun(tokens, i, lemma):
                out.append(lemma)
        return out

    def similar(self, a: str, b: str) -> bool:
        return a == b

    def describe(self) -> dict[str, Any]:
        res = self._nlp.resources()
        return {
            "backend": self.name,
            "tokenizer": res["word_tokenizer"],
            "tagger": "offline rule (eval.amber_nlp.is_noun)",
            "lemmatizer": f"{res['lemmatizer']} ({res['wordnet']}; {res['morphy']})",
            "similarity": "exact match",
            "versions": _versions(),
        }


def is_noun(tokens: list[str], i: int, lemma: str) -> bool:
    """Offline stand-in for ``pos_tag(...)[i][1].startswith("NN")`` on a token whose lemma is an AMBER object word.

    A word right after "to", a modal or a subject pronoun is a verb, and one right before a colour word modifies it
    ("light blue"); "can" is a noun only right after an article or possessive; a singular "-ing" word is a verb
    right after a form of "be" or a usual subject; everything else is a noun (AMBER's object words are nouns first;
    its ambiguous colour and shape words are safe words, which never count as hallucinations).
    """
    prev = tokens[i - 1].lower() if i else ""
    low = tokens[i].lower()
    if prev in VERB_CONTEXT or (i + 1 < len(tokens) and tokens[i + 1].lower() in COLOUR_WORDS):
        return False
    if low == "can":
        return prev in CAN_DETERMINERS
    if low.endswith("ing") and low == lemma.lower():
        return prev not in ING_VERB_CONTEXT
    return True


def build_nlp(
    backend: str = "auto", *, threshold: float = SIMILARITY_THRESHOLD, spacy_model: str = SPACY_MODEL
) -> AmberNLP:
    """``"official"`` (raises when not installed), ``"offline"``, or ``"auto"``: official when installed, else
    offline with a warning."""
    if backend == "official":
        return OfficialNLP(threshold, spacy_model)
    if backend == "offline":
        return OfflineNLP()
    if backend != "auto":
        raise ValueError(f"unknown AMBER word processing '{backend}'. Available: auto, official, offline")
    try:
        return OfficialNLP(threshold, spacy_model)
    except RuntimeError as e:
        logger.warning("%s; scoring with the offline approximation (labelled 'offline' in results.json)", e)
        return OfflineNLP()


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("nltk", "spacy", SPACY_MODEL.replace("_", "-")):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
