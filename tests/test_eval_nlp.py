"""eval.nlp: WordNet lemmas as NLTK 3.8.1 finds them, spaCy's rule lemmas, word tokens and the offline tagger.

Expected values derived by hand from WordNet's morphy (exception list, then suffix rules, then the rules again)
and spaCy 3's rule lemmatizer (base forms lower-cased, inflected forms through rules, index and exceptions).
"""

from __future__ import annotations

import pytest

from eval import nlp


@pytest.fixture()
def offline(monkeypatch):
    """The offline path (NLTK data and spaCy models ignored); skipped when no WordNet table is installed."""
    monkeypatch.setenv("RLAIFV_NLP", "offline")
    nlp.clear_caches()
    try:
        nlp.available_backend()
    except RuntimeError as e:
        pytest.skip(str(e))
    yield
    monkeypatch.delenv("RLAIFV_NLP")
    nlp.clear_caches()


def tiny_tables() -> nlp.WordNetTables:
    index = {w: {"n"} for w in ("box", "men", "man", "le", "glass", "scissors")}
    exceptions = {"n": {"men": ["man"]}, "v": {}, "a": {}, "r": {}}
    return nlp.WordNetTables(index, exceptions, "hand")


def test_morphy_steps_on_hand_tables():
    """men: the exception list gives [men, man] (both WordNet nouns, the word first). boxes: one round of rules
    gives boxe (s), box (xes), of which box is a noun. less: one round gives les (s) only, not a noun; the rules
    again give le (NLTK 3.8.1's step 3). glasses: glasse, glass (ses) -> glass. scissors: itself, a noun."""
    t = tiny_tables()
    assert nlp.morphy("men", "n", t) == ["men", "man"]
    assert nlp.morphy("boxes", "n", t) == ["box"]
    assert nlp.morphy("less", "n", t) == ["le"]
    assert nlp.morphy("glasses", "n", t) == ["glass"]
    assert nlp.morphy("scissors", "n", t) == ["scissors"]
    assert nlp.morphy("zzz", "n", t) == []


def test_offline_lemmas_of_the_named_words(offline):
    """The words the issue names, on whichever offline WordNet table is installed."""
    words = "policemen tvs minibuses collies men scissors people mice women teeth".split()  # teeth: like men
    assert [
        nlp.lemmatize(w) for w in words
    ] == "policeman tv minibus collie men scissors people mouse woman teeth".split()
    assert nlp.lemmatize("running", "v") == "run" and nlp.lemmatize("bigger", "a") == "big"
    assert nlp.resources()["tagger"] == "offline heuristic" and nlp.resources()["forced_offline"]


def test_both_offline_tables_agree_on_single_words(offline):
    """WordNet's own files and spacy-lookups-data's tables give the same lemma for single (unhyphenated) words;
    skipped unless both are installed."""
    from pathlib import Path

    dirs = [d for d in nlp.WORDNET_DIRS if (Path(d) / "index.noun").is_file()]
    try:
        spl = nlp.WordNetTables.from_spacy_lookups()
    except ImportError:
        pytest.skip("spacy-lookups-data not installed")
    if not dirs:
        pytest.skip("no WordNet dict folder installed")
    files = nlp.WordNetTables.from_dict_dir(dirs[0])
    words = [w for w in files.exceptions["n"] if w.isalpha()] + [
        w + "s" for w in list(files.index)[::50] if w.isalpha()
    ]
    lem = [(min(nlp.morphy(w, "n", t), key=len, default=w)) for t in (files, spl) for w in words]
    assert lem[: len(words)] == lem[len(words) :]


def test_offline_morphy_matches_nltk_when_its_wordnet_is_installed():
    """Only where NLTK and its wordnet data are installed (the published path): the same lemmas."""
    nltk = pytest.importorskip("nltk")
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        pytest.skip("NLTK wordnet data not installed")
    from nltk.stem import WordNetLemmatizer

    tables = nlp._offline_tables()
    if tables is None:
        pytest.skip("no offline WordNet table installed")
    words = "policemen tvs minibuses collies men scissors people glasses buses knives wolves dishes ponies".split()
    want = [WordNetLemmatizer().lemmatize(w) for w in words]
    assert [min(nlp.morphy(w, "n", tables), key=len, default=w) for w in words] == want


@pytest.mark.parametrize(
    ("word", "tag", "lemma"),
    [
        ("scissors", "NNS", "scissor"),  # rule s -> "scissor", not in the index: the out-of-index form
        ("men", "NNS", "man"),  # rule men -> man
        ("mice", "NNS", "mouse"),  # exception list
        ("glasses", "NNS", "glass"),  # ses -> s in the index, s -> "glasse" not
        ("buses", "NNS", "bus"),
        ("tvs", "NNS", "tv"),
        ("Dogs", "NN", "dogs"),  # a singular-tagged noun is its lower-cased text
        ("Dog", "NNP", "Dog"),  # proper nouns keep their case
        ("holding", "VBG", "hold"),
        ("potted", "JJ", "potted"),
        ("a", "DT", "a"),
    ],
)
def test_spacy_rule_lemma(word, tag, lemma):
    pytest.importorskip("spacy_lookups_data")
    assert nlp.spacy_rule_lemma(word, tag) == lemma


def test_word_tokenize_offline(offline):
    pytest.importorskip("nltk")
    """Sentences end at ". " except after an abbreviation, an initial or a number; Treebank tokens within."""
    assert nlp.split_sentences("a dog. the cat? yes! 3. ok e.g. this") == [
        "a dog.",
        "the cat?",
        "yes!",
        "3. ok e.g. this",
    ]
    assert nlp.split_sentences("a dog... and a cat. end") == ["a dog... and a cat.", "end"]
    got = nlp.word_tokenize("a dog. mr. smith's cat sat on the mat, near tvs.")
    assert got == ["a", "dog", ".", "mr.", "smith", "'s", "cat", "sat", "on", "the", "mat", ",", "near", "tvs", "."]


def test_heuristic_tags(offline):
    pytest.importorskip("spacy_lookups_data")
    tables = nlp._offline_tables()

    def tags(text: str) -> list[str]:
        return nlp.heuristic_tags(text.split(), tables)

    assert tags("a red car") == ["DT", "JJ", "NN"]  # noun-or-adjective before a noun: adjective
    assert tags("a man holding an umbrella") == ["DT", "NN", "VBG", "DT", "NN"]
    assert (
        tags("a scissors") == ["DT", "NNS"] and tags("a gas") == ["DT", "NN"] and tags("a policemen") == ["DT", "NNS"]
    )
    assert tags("a iPhone") == ["DT", "NNP"] and tags("a tennis ball") == ["DT", "NN", "NN"]
    words = [t.text for t in nlp.tag_phrase("a t-shirt/cup")]
    assert words == ["a", "t", "-", "shirt", "/", "cup"]


def test_spacy_rule_lemma_matches_spacy_where_installed():
    """Where spaCy is installed: its own rule lemmatizer (blank English pipeline, the same lookups tables, the
    POS and morphology the trained pipelines' attribute ruler gives each tag) agrees with ours."""
    spacy = pytest.importorskip("spacy")
    pytest.importorskip("spacy_lookups_data")
    en = spacy.blank("en")
    lemmatizer = en.add_pipe("lemmatizer", config={"mode": "rule"})
    en.initialize()
    tags = {
        "NN": ("NOUN", "Number=Sing"),
        "NNS": ("NOUN", "Number=Plur"),
        "NNP": ("PROPN", "Number=Sing"),
        "VBG": ("VERB", "Aspect=Prog|Tense=Pres|VerbForm=Part"),
        "VBZ": ("VERB", "Number=Sing|Person=3|Tense=Pres|VerbForm=Fin"),
        "JJR": ("ADJ", "Degree=Cmp"),
    }
    words = "policemen tvs minibuses collies men scissors people glasses buses mice geese oxen dogs Dog iPhone".split()
    words += "runs running bigger happiest potted knives wolves skis benches ties teddies".split()
    for tag, (pos, morph) in tags.items():
        for w in words:
            doc = en.make_doc(w)
            doc[0].tag_, doc[0].pos_ = tag, pos
            doc[0].set_morph(morph)
            assert nlp.spacy_rule_lemma(w, tag) == lemmatizer(doc)[0].lemma_, (w, tag)
