"""English word processing of the published Object HalBench script: NLTK's WordNet lemmas and word tokens, spaCy's
noun tags and lemmas; each runs through NLTK / spaCy when their data is installed, else through an offline equivalent.

Stable API: ``lemmatize(word, pos="n")``, ``word_tokenize(text)``, ``tag_phrase(text)``, ``available_backend()``,
``resources()``. ``RLAIFV_NLP=offline`` forces the offline path; docs/BENCHMARK_PARITY.md lists where it can differ.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# WordNet's morphy suffix rules (as NLTK's WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS and WordNet's own).
MORPHY_RULES = {
    "n": [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh")]
    + [("men", "man"), ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}
_WN_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_SPACY_POS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/local/WordNet-3.0/dict")
INSTALL_HINT = (
    "install one of: `pip install nltk && python -m nltk.downloader wordnet punkt punkt_tab` (the published path), "
    "`pip install spacy-lookups-data` (WordNet's tables, offline), or Debian's `wordnet-base` package "
    "(or set RLAIFV_WORDNET_DIR to a WordNet 3.0 dict folder)"
)


@dataclass
class WordNetTables:
    """WordNet lemma index (lemma -> set of POS letters) and exception lists (pos -> inflected -> bases)."""

    index: dict[str, set[str]]
    exceptions: dict[str, dict[str, list[str]]]
    source: str

    @classmethod
    def from_dict_dir(cls, root: str | Path) -> WordNetTables:
        """Read ``index.{noun,verb,adj,adv}`` and ``{noun,verb,adj,adv}.exc`` of a WordNet 3.0 dict folder."""
        root = Path(root)
        index: dict[str, set[str]] = {}
        exceptions: dict[str, dict[str, list[str]]] = {}
        for pos, name in _WN_FILES.items():
            with open(root / f"index.{name}", encoding="utf-8") as f:
                for line in f:
                    if not line.startswith(" "):  # the licence header lines start with two spaces
                        index.setdefault(line.split(" ", 1)[0], set()).add(pos)
            with open(root / f"{name}.exc", encoding="utf-8") as f:
                exceptions[pos] = {t[0]: t[1:] for t in (ln.split() for ln in f) if t}
        return cls(index, exceptions, f"wordnet-files:{root}")

    @classmethod
    def from_spacy_lookups(cls) -> WordNetTables:
        """spaCy's English ``lemma_index`` / ``lemma_exc`` tables (WordNet 3.0's single-word lemmas)."""
        t = spacy_tables()
        index: dict[str, set[str]] = {}
        for pos, name in _SPACY_POS.items():
            for lemma in t["index"].get(name, []):
                index.setdefault(lemma, set()).add(pos)
        exceptions = {pos: dict(t["exc"].get(name, {})) for pos, name in _SPACY_POS.items()}
        return cls(index, exceptions, f"spacy-lookups-data {t['version']}")


def morphy(word: str, pos: str, tables: WordNetTables) -> list[str]:
    """WordNet lemmas of ``word``, as NLTK 3.8.1's ``WordNetCorpusReader._morphy`` finds them.

    Exceptions first (the word itself and its listed bases); else one round of suffix rules; if none of those
    is in WordNet, the rules are applied again and again (NLTK 3.9 dropped this last step; the published
    environment pins 3.8.1).
    """
    rules = MORPHY_RULES[pos]

    def known(forms: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(f for f in forms if pos in tables.index.get(f, ())))

    def apply(forms: Sequence[str]) -> list[str]:
        return [f[: -len(old)] + new for f in forms for old, new in rules if f.endswith(old)]

    if word in tables.exceptions[pos]:
        return known([word, *tables.exceptions[pos][word]])
    forms = apply([word])
    found = known([word, *forms])
    while not found and forms:
        forms = apply(forms)
        found = known(forms)
    return found


# --- backend discovery ---------------------------------------------------------------------------------------


def _forced_offline() -> bool:
    return os.environ.get("RLAIFV_NLP", "").lower() == "offline"


@functools.lru_cache(maxsize=1)
def _nltk_lemmatizer() -> Callable[[str, str], str] | None:
    if _forced_offline():
        return None
    try:
        from nltk.stem import WordNetLemmatizer

        lem = WordNetLemmatizer()
        lem.lemmatize("dogs")  # loads corpora/wordnet (folder or zip) now: a missing corpus fails here, not mid-run
        return lem.lemmatize
    except (ImportError, LookupError, OSError) as e:
        logger.debug("NLTK WordNet lemmatizer unavailable: %s", e)
        return None


@functools.lru_cache(maxsize=1)
def _offline_tables() -> WordNetTables | None:
    explicit = os.environ.get("RLAIFV_WORDNET_DIR")
    for d in ([explicit] if explicit else []) + list(WORDNET_DIRS):
        if d and (Path(d) / "index.noun").is_file() and (Path(d) / "noun.exc").is_file():
            return WordNetTables.from_dict_dir(d)
    if explicit:
        raise FileNotFoundError(
            f"RLAIFV_WORDNET_DIR={explicit} has no index.noun / noun.exc; point it at a WordNet dict"
        )
    try:
        return WordNetTables.from_spacy_lookups()
    except ImportError:
        return None


@functools.lru_cache(maxsize=1)
def spacy_tables() -> dict[str, Any]:
    """spaCy's English lemma tables (index, exc, rules) from the ``spacy-lookups-data`` package."""
    from importlib.metadata import version
    from importlib.resources import files

    try:
        data = files("spacy_lookups_data") / "data"
    except ModuleNotFoundError as e:
        raise ImportError(f"the spacy-lookups-data package is not installed; {INSTALL_HINT}") from e

    def load(name: str) -> Any:
        with gzip.open(str(data / f"en_lemma_{name}.json.gz"), "rt", encoding="utf-8") as f:
            return json.load(f)

    return {
        "index": load("index"),
        "exc": load("exc"),
        "rules": load("rules"),
        "version": version("spacy-lookups-data"),
    }


def available_backend() -> str:
    """Which lemmatizer ``lemmatize`` uses: "nltk", "wordnet-files" or "spacy-lookups-data" (raises if none)."""
    if _nltk_lemmatizer() is not None:
        return "nltk"
    tables = _offline_tables()
    if tables is None:
        raise RuntimeError(f"no WordNet lemmatizer is available; {INSTALL_HINT}")
    return tables.source.split(":")[0].split(" ")[0]


def lemmatize(word: str, pos: str = "n") -> str:
    """NLTK ``WordNetLemmatizer().lemmatize(word, pos)``: the shortest WordNet lemma, else the word unchanged.

    Example: ``lemmatize("policemen") == "policeman"``; ``lemmatize("men") == "men"`` (WordNet lists "men"
    itself, and of equal-length lemmas the first wins).
    """
    nltk_lem = _nltk_lemmatizer()
    if nltk_lem is not None:
        return nltk_lem(word, pos)
    tables = _offline_tables()
    if tables is None:
        raise RuntimeError(f"no WordNet lemmatizer is available; {INSTALL_HINT}")
    lemmas = morphy(word, "a" if pos == "s" else pos, tables)
    return min(lemmas, key=len) if lemmas else word


# --- word tokens (nltk.word_tokenize) ------------------------------------------------------------------------

# Tokens Punkt's English model treats as abbreviations (the period stays on them); the offline splitter's list.
_ABBREVIATIONS = set("mr mrs ms dr st jr sr vs etc inc co ltd corp dept no fig approx e.g i.e a.m p.m u.s u.k".split())
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]}]*\s+")


@functools.lru_cache(maxsize=1)
def _punkt() -> Callable[[str], list[str]] | None:
    if _forced_offline():
        return None
    try:
        import nltk

        nltk.word_tokenize("a dog. a cat.")  # needs the punkt (3.8) / punkt_tab (3.9+) data
        return nltk.word_tokenize
    except (ImportError, LookupError, OSError) as e:
        logger.debug("NLTK punkt unavailable: %s", e)
        return None


def split_sentences(text: str) -> list[str]:
    """Offline stand-in for Punkt: a sentence ends at . ! ? before whitespace, except after an abbreviation, an
    initial, a number or an ellipsis."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        head = text[start : m.start()].split()
        last = head[-1] if head else ""
        word = last.rstrip("\"')]}")
        if word.endswith(".."):  # an ellipsis before a lower-case word (the text is lower-cased) is no end
            continue
        if word.endswith("."):
            stem = word[:-1].lower()
            if stem in _ABBREVIATIONS or len(stem) == 1 or stem.replace(",", "").isdigit():
                continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize``: Punkt sentences, then the Treebank word tokenizer on each (offline: the same
    Treebank tokenizer of the ``nltk`` package on ``split_sentences``)."""
    punkt = _punkt()
    if punkt is not None:
        return punkt(text)
    try:
        from nltk.tokenize.destructive import NLTKWordTokenizer
    except ImportError as e:
        raise ImportError(
            f"the Object HalBench paper protocol needs the nltk package (`pip install nltk`): {e}"
        ) from e
    tok = NLTKWordTokenizer()
    return [t for sent in split_sentences(text) for t in tok.tokenize(sent)]


# --- spaCy noun tags and lemmas (the judge's object names) ---------------------------------------------------

NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
SPACY_MODEL = os.environ.get("RLAIFV_SPACY_MODEL", "en_core_web_trf")  # the published script's pipeline


@dataclass(frozen=True)
class Token:
    """One token of a tagged phrase: its text, Penn Treebank tag and lemma (as spaCy's ``tag_`` / ``lemma_``)."""

    text: str
    tag: str
    lemma: str


@functools.lru_cache(maxsize=1)
def _spacy_pipeline() -> Any | None:
    if _forced_offline():
        return None
    try:
        import spacy

        return spacy.load(SPACY_MODEL)
    except (ImportError, OSError) as e:
        logger.debug("spaCy pipeline %s unavailable: %s", SPACY_MODEL, e)
        return None


@functools.lru_cache(maxsize=1)
def _spacy_tokenizer() -> Callable[[str], list[str]] | None:
    try:
        import spacy
    except ImportError:
        return None
    tok = spacy.blank("en").tokenizer  # the trained English pipelines use the language's default tokenizer
    return lambda text: [t.text for t in tok(text)]


def _regex_tokens(text: str) -> list[str]:
    out = []
    for chunk in text.split():
        m = re.fullmatch(r"([\"'(\[{]*)(.*?)((?:'s|')?)([\"')\]}.,:;!?]*)", chunk)
        lead, core, poss, trail = m.groups() if m else ("", chunk, "", "")
        out += list(lead) + [p for p in re.split(r"(?<=[A-Za-z])(-|–|—|/)(?=[A-Za-z])", core) if p]
        out += [poss] if poss else []
        out += list(trail)
    return out


_CLOSED = {
    "DT": "a an the this that these those some any each every no another either neither all both".split(),
    "IN": "of in on at by for with without from to into onto over under near behind beside between above below "
    "across through around inside outside against along among upon like as than".split(),
    "CC": "and or but nor".split(),
    "PRP": "it its he she they them his her their we you i".split(),
    "CD": "one two three four five six seven eight nine ten dozen hundred".split(),
}
_CLOSED_TAG = {w: tag for tag, words in _CLOSED.items() for w in words}


# Nouns used only in the plural, which a trained tagger tags NNS although WordNet lists no singular form.
_PLURALIA = set(
    "scissors trousers pliers tongs tweezers binoculars pajamas pyjamas jeans shorts pants glasses sunglasses "
    "goggles headphones earphones clothes".split()
)


def _is_plural(low: str, tables: WordNetTables) -> bool:
    """Plural-looking: a WordNet noun exception ("mice"), a plurale tantum, a form whose rule-made singular is a
    WordNet noun ("tvs" -> "tv", "policemen" -> "policeman"; not "gas", "bus", "glass"), or an unknown -s word."""
    if low in tables.exceptions["n"]:  # "mice mouse"; but WordNet lists "gas gas": a base form
        return any(base != low for base in tables.exceptions["n"][low])
    if low in _PLURALIA:
        return True
    if low.endswith(("ss", "us", "is", "ous")):
        return False
    singular = any(
        low.endswith(old) and "n" in tables.index.get(low[: len(low) - len(old)] + new, ())
        for old, new in MORPHY_RULES["n"]
    )
    return singular or (low.endswith("s") and "n" not in tables.index.get(low, ()))


def heuristic_tags(words: Sequence[str], tables: WordNetTables) -> list[str]:
    """Penn tags for a short noun phrase without a trained tagger: closed-class words by list, capitalised
    words NNP, words WordNet knows only as adjectives JJ, noun-or-adjective words JJ before a noun, the rest
    nouns (NNS when plural-looking)."""

    def nounish(w: str) -> bool:
        low = w.lower()
        return (
            w.isalpha()
            and low not in _CLOSED_TAG
            and ("n" in tables.index.get(low, ()) or bool(morphy(low, "n", tables)))
        )

    tags = []
    for i, w in enumerate(words):
        low = w.lower()
        if not any(c.isalnum() for c in w):
            tags.append("HYPH" if w in "-–—" else w if w in ",.:" else "NFP")
        elif low in _CLOSED_TAG:
            tags.append(_CLOSED_TAG[low])
        elif low.replace(".", "").replace(",", "").isdigit():
            tags.append("CD")
        elif any(c.isupper() for c in w):
            tags.append("NNPS" if _is_plural(low, tables) else "NNP")
        else:
            pos = tables.index.get(low, set())
            adjective = "a" in pos
            nxt = words[i + 1] if i + 1 < len(words) else None
            if not nounish(w):
                verbal = low.endswith(("ing", "ed")) and bool(morphy(low, "v", tables))
                tags.append("JJ" if "a" in pos else ("VBG" if low.endswith("ing") else "VBN") if verbal else "NN")
            elif low.endswith("ing") and nxt is not None and nxt.lower() in _CLOSED_TAG and morphy(low, "v", tables):
                tags.append("VBG")  # "man holding an umbrella": a participle before its object
            elif adjective and nxt is not None and nounish(nxt):
                tags.append("JJ")
            else:
                tags.append("NNS" if _is_plural(low, tables) else "NN")
    return tags


def spacy_rule_lemma(text: str, tag: str) -> str:
    """spaCy 3's English rule lemmatizer for one token of a given Penn tag (``EnglishLemmatizer.rule_lemmatize``
    with the tag's universal POS and morphology): base forms (NN, VB, VBP, JJ) are lower-cased as they are,
    proper nouns keep their case, inflected forms go through the lookups' rules, index and exceptions."""
    base = {"NN", "VB", "VBP", "JJ", "RB"}
    upos = {"NNS": "noun", "VBZ": "verb", "VBD": "verb", "VBG": "verb", "VBN": "verb", "JJR": "adj", "JJS": "adj"}
    if tag in ("NNP", "NNPS"):
        return text
    if tag in base or tag not in upos:
        return text.lower()
    t = spacy_tables()
    pos = upos[tag]
    exc, rules = t["exc"].get(pos, {}), t["rules"].get(pos, [])
    index_set = _index_set(pos)
    string = text.lower()
    forms, oov = [], []
    for old, new in rules:
        if string.endswith(old):
            form = string[: len(string) - len(old)] + new
            if not form:
                continue
            (forms if form in index_set or not form.isalpha() else oov).append(form)
    forms = list(dict.fromkeys(forms))
    for form in exc.get(string, []):
        if form not in forms:
            forms.insert(0, form)
    return (forms or oov or [text])[0]


@functools.lru_cache(maxsize=8)
def _index_set(pos: str) -> frozenset[str]:
    return frozenset(spacy_tables()["index"].get(pos, []))


def tag_phrase(text: str) -> list[Token]:
    """Tokens, tags and lemmas of ``text`` as the published script's spaCy pipeline gives them (``en_core_web_trf``
    when installed; offline: spaCy's or a regex tokenizer, ``heuristic_tags`` and ``spacy_rule_lemma``)."""
    nlp = _spacy_pipeline()
    if nlp is not None:
        return [Token(t.text, t.tag_, t.lemma_) for t in nlp(text)]
    tokenize = _spacy_tokenizer() or _regex_tokens
    words = tokenize(text)
    tables = _offline_tables() or WordNetTables.from_spacy_lookups()
    return [Token(w, tag, spacy_rule_lemma(w, tag)) for w, tag in zip(words, heuristic_tags(words, tables))]


def resources() -> dict[str, Any]:
    """What produced the words, for the results JSON: lemmatizer, tokenizer and tagger with their versions."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    nlp = _spacy_pipeline()
    try:
        lemmatizer = available_backend()
    except RuntimeError:
        lemmatizer = "unavailable"
    tables = None if lemmatizer in ("nltk", "unavailable") else _offline_tables()
    return {
        "lemmatizer": lemmatizer,
        "wordnet": "nltk_data corpora/wordnet" if lemmatizer == "nltk" else (tables.source if tables else None),
        "morphy": "nltk " + str(ver("nltk")) if lemmatizer == "nltk" else "ours (NLTK 3.8.1 semantics)",
        "word_tokenizer": "nltk punkt + treebank" if _punkt() is not None else "offline sentences + nltk treebank",
        "tagger": f"spacy {SPACY_MODEL} {nlp.meta.get('version')}" if nlp is not None else "offline heuristic",
        "phrase_tokenizer": "spacy" if nlp is not None else ("spacy blank en" if _spacy_tokenizer() else "regex"),
        "versions": {k: ver(k) for k in ("nltk", "spacy", "spacy-lookups-data")},
        "forced_offline": _forced_offline(),
    }


def clear_caches() -> None:
    """Forget the discovered backends (after changing ``RLAIFV_NLP`` or installing data in a running process)."""
    for f in (_nltk_lemmatizer, _offline_tables, spacy_tables, _punkt, _spacy_pipeline, _spacy_tokenizer, _index_set):
        f.cache_clear()
