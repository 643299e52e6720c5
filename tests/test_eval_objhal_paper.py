"""Object HalBench scored as the published script scores it (``eval.chair_paper``, ``objhal --protocol paper``).

Every expected value is derived by hand from the published code's rules (eval_gpt_obj_halbench.py): NLTK WordNet
lemmas for captions, spaCy lemmas of "a {object}" for the judge's objects, the two-word table, distinct strings as
mentions, ``split(" ")`` lengths. The synonym table is the published one (``reference`` folder; skipped without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import nlp
from eval.chair_paper import PaperChair, answer_length, paper_detail, paper_summary
from eval.judges import JudgeRequest, JudgeResponse, JudgeStats
from eval.objhal import evaluate_objhal
from eval.parsers import parse_object_list_paper


@pytest.fixture(scope="module")
def table(reference_dir: Path) -> Path:
    path = reference_dir / "data" / "rlaifv-original" / "eval" / "synonyms_refine.txt"
    if not path.is_file():
        pytest.skip("published synonym table not in the reference folder")
    pytest.importorskip("nltk")  # its Treebank word tokenizer (no data needed)
    try:
        nlp.available_backend()
        nlp.spacy_tables()
    except (RuntimeError, ImportError) as e:
        pytest.skip(str(e))
    return path


@pytest.fixture(scope="module")
def chair(table: Path) -> PaperChair:
    return PaperChair.from_table(table)


def test_published_table_is_read_as_the_script_reads_it(chair):
    """Lines split on ", ": 80 classes; later lines win for a repeated name; the script's two-word rules."""
    assert len(set(chair.classes.values())) == 80
    assert chair.classes["policeman"] == "person" and chair.classes["iPhone"] == "cell phone"
    assert chair.classes["seat"] == "chair" and chair.classes["bow"] == "tie" and chair.classes["minibus"] == "bus"
    assert "scissor" not in chair.surface_forms and "men" not in chair.surface_forms
    assert chair.double_words["toilet seat"] == "toilet" and chair.double_words["bow tie"] == "tie"
    assert chair.double_words["baby elephant"] == "elephant" and chair.double_words["passenger jet"] == "jet"
    assert chair.double_words["train track"] == "train track" and chair.double_words["wine glas"] == "wine glass"


def test_wordnet_lemmas_of_the_named_words(table):
    """NLTK's WordNetLemmatizer: the shortest WordNet noun lemma. "men" is itself a WordNet noun and as long as
    "man", so it stays; "scissors" is in WordNet and "scissor" is not, so it stays."""
    words = "policemen tvs minibuses collies men scissors people women dogs glasses".split()
    want = "policeman tv minibus collie men scissors people woman dog glass".split()
    assert [nlp.lemmatize(w) for w in words] == want


def test_caption_mentions_ground_truth_path(chair):
    """Captions: tokens -> lemmas -> two-word rules (keeping the other words) -> table; repeats are kept."""
    assert chair.caption_mentions("Two policemen watch tvs.") == [("policeman", "person"), ("tv", "tv")]
    assert chair.caption_mentions("A collie runs past minibuses.") == [("collie", "dog"), ("minibus", "bus")]
    assert chair.caption_mentions("Three men walk.") == []  # "men" is no table name
    assert chair.caption_mentions("A dog and a dog.") == [("dog", "dog"), ("dog", "dog")]
    assert chair.caption_mentions("A toilet seat is up.") == [("toilet", "toilet")]
    assert chair.caption_mentions("The seat of the toilet.") == [("toilet", "toilet")]  # seat dropped
    assert chair.caption_mentions("A seat.") == [("seat", "chair")]
    assert chair.caption_mentions("A bus stop near train tracks.") == [("bus", "bus")]  # "train track": no class
    assert chair.caption_mentions("A baby elephant, an adult giraffe and a passenger jet.") == [
        ("elephant", "elephant"),
        ("giraffe", "giraffe"),
        ("jet", "airplane"),
    ]


def test_judge_objects_compounds_are_dropped(chair):
    """A judge object is one noun run: a compound that is no table name is dropped whole (no scan inside)."""
    objs = ["water bottle", "tennis ball", "coffee cup", "toilet paper", "train tracks", "bus stop", "computer mouse"]
    words = chair.judge_object_words(objs)
    assert words == ["water bottle", "tennis ball", "coffee cup", "toilet paper", "train track", "bus stop"] + [
        "computer mouse"
    ]
    assert chair.coco_words(words) == []


def test_judge_objects_two_word_rules_and_mentions(chair):
    """ "toilet seat" is toilet only; modifiers map to the animal / vehicle; man, person, people are three distinct
    strings, three mentions of person; repeated strings count once; spaCy lemmas of plurals (NNS): collie, tv,
    minibus, policeman, man, and "scissor" (not a table name, dropped)."""
    words = chair.judge_object_words(["toilet seat", "passenger jet", "baby elephant", "adult giraffe"])
    assert chair.coco_words(words) == [
        ("toilet", "toilet"),
        ("jet", "airplane"),
        ("elephant", "elephant"),
        ("giraffe", "giraffe"),
    ]
    people = chair.coco_words(chair.judge_object_words(["man", "person", "people", "man", "dog", "dogs"]))
    assert people == [("man", "person"), ("person", "person"), ("people", "person"), ("dog", "dog")]
    plurals = chair.judge_object_words(["collies", "tvs", "minibuses", "policemen", "men", "scissors"])
    assert plurals == ["collie", "tv", "minibus", "policeman", "man", "scissor"]
    assert [c for _, c in chair.coco_words(plurals)] == ["dog", "tv", "bus", "person", "person"]


def test_length_is_split_on_single_spaces_after_stripping_assistant():
    """ "Assistant: A dog  runs." -> "A dog  runs." -> ["A", "dog", "", "runs."]: 4 (split() would give 3)."""
    assert answer_length("Assistant: A dog  runs.\n") == 4
    assert answer_length("A dog\nruns") == 2


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ('```json\n["dog", "cat"]\n```', ["dog", "cat"]),
        ('Objects:\n["dog", "cat"]', ["dog", "cat"]),
        ('["dog"]\nHope this helps.', None),  # '["' present but the last line is prose
        ("[]", None),  # no '["' and no json fence: the published script asks again
        ("()", None),
        ("['dog']", None),
        ('```\n["dog"]\n```', None),  # a fence without "json": the last line is ```
        ("```json\n[]\n```", []),
        ('```json\n{"objects": ["dog"]}\n```', {"objects": ["dog"]}),
    ],
)
def test_published_object_list_parser(text, want):
    assert parse_object_list_paper(text) == want


def test_paper_summary_by_hand():
    """Three answers: A mentions dog (gt) and cat (not gt); B mentions nothing; C mentions dog (gt). CHAIRs 1/3,
    CHAIRs_refine 1/2 (B has no COCO word), CHAIRi 1/3, obj_rec (1+0+1)/(2+1+1) = 1/2; lengths 3, 1, 2."""
    a = paper_detail([("dog", "dog"), ("cat", "cat")], {"dog", "person"}, "a b c")
    b = paper_detail([], {"dog"}, "x")
    c = paper_detail([("dogs", "dog")], {"dog"}, "y z")
    m = paper_summary([a, b, c])
    assert (m["CHAIRs"], m["CHAIRs_refine"], m["CHAIRi"], m["obj_rec"]) == pytest.approx((1 / 3, 1 / 2, 1 / 3, 1 / 2))
    assert (m["response_hall"], m["object_hall"], m["avg_word_len"]) == pytest.approx((50.0, 100 / 3, 2.0))
    assert (m["coco_sentence_num"], m["coco_word_count"], m["gt_word_count"]) == (2, 2, 4)


class AttemptJudge:
    """Answers from (substring, attempt) -> text; anything else gets "I see a dog." (unparseable)."""

    def __init__(self, table: dict[tuple[str, int], str]) -> None:
        self.id, self.stats, self.table, self.requests = "canned", JudgeStats(), table, []

    def complete(self, requests: list[JudgeRequest], *, progress: bool = False) -> list[JudgeResponse]:
        self.requests += requests
        texts = [r.messages[-1][1] for r in requests]
        return [
            JudgeResponse(next((v for (k, n), v in self.table.items() if k in t and n == r.attempt), "I see a dog."))
            for t, r in zip(texts, requests)
        ]


@pytest.fixture()
def coco(tmp_path: Path) -> tuple[Path, Path]:
    cats = [{"id": i, "name": n} for i, n in [(1, "person"), (18, "dog"), (70, "toilet"), (25, "giraffe")]]
    anns = [(1, 1), (1, 18), (2, 70), (3, 25)]
    inst = tmp_path / "instances.json"
    inst.write_text(
        json.dumps(
            {
                "categories": cats,
                "annotations": [{"id": k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(anns)],
            }
        )
    )
    caps = tmp_path / "captions.json"
    texts = [(1, "Two policemen stand near tvs."), (2, "A collie sits by minibuses."), (2, "Men walk.")]
    texts.append((3, "A bus stop by the train tracks."))
    caps.write_text(
        json.dumps({"annotations": [{"id": k, "image_id": i, "caption": t} for k, (i, t) in enumerate(texts)]})
    )
    return inst, caps


ANSWERS = [
    {
        "id": "a1",
        "image_id": 1,
        "question": "Q",
        "answer": "Assistant: A man and a person and people stand near a dog and a water bottle.",
    },
    {"id": "a2", "image_id": 2, "question": "Q", "answer": "The toilet  seat is next to a mouse."},
    {
        "id": "a3",
        "image_id": 3,
        "question": "Q",
        "answer": "A passenger jet flies over an adult giraffe by the bus stop.",
    },
    {"id": "a4", "image_id": 3, "question": "Q", "answer": "Giraffe."},
    {"id": "a5", "image_id": 1, "question": "Q", "answer": "Nothing the judge can list here."},
]
REPLIES = {
    ("water bottle", 0): '```json\n["man", "person", "people", "dog", "water bottle", "tennis ball"]\n```',
    ("toilet  seat", 0): 'Objects:\n["toilet seat", "computer mouse", "coffee cup", "scissors", "baby elephant"]',
    ("passenger jet", 0): "[]",
    (
        "passenger jet",
        1,
    ): '```json\n["passenger jet", "adult giraffe", "bus stop", "train tracks", "toilet paper"]\n```',
}


def test_evaluate_objhal_paper_end_to_end(coco, table, tmp_path):
    """Ground truth: image 1 {person, dog} + captions {person (policeman), tv}; image 2 {toilet} + {dog (collie),
    bus (minibus)} ("men" is no class); image 3 {giraffe} + {bus} (train track has no class).
    a1: person x3 (man, person, people), dog: 4 mentions, none hallucinated, recalls {person, dog}.
    a2: toilet, elephant* (computer mouse, coffee cup, scissor dropped): 1/2, recalls {toilet}.
    a3: first reply "[]" is re-asked; airplane* (passenger jet), giraffe: 1/2, recalls {giraffe}.
    a4: 1 word, no judge call, no mention. a5: never parses (4 attempts with reasks=3): an error, excluded.
    CHAIRs 2/4, CHAIRs_refine 2/3, CHAIRi 2/8, obj_rec 4/(3+3+2+2) = 0.4; lengths split(" ") 15, 9, 12, 1 -> 9.25.
    """
    inst, caps = coco
    judge = AttemptJudge(REPLIES)
    template = "Q: {question}\nA: {answer}\nList the objects."
    res = evaluate_objhal(
        ANSWERS,
        inst,
        captions_path=caps,
        synonyms_path=table,
        extractor=judge,
        prompt=template,
        reasks=3,
        out_dir=tmp_path / "o",
    )
    m = res["metrics"]
    assert (m["CHAIRs"], m["CHAIRs_refine"], m["CHAIRi"], m["obj_rec"]) == pytest.approx((0.5, 2 / 3, 0.25, 0.4))
    assert (m["response_hall"], m["object_hall"], m["avg_word_len"]) == pytest.approx((200 / 3, 25.0, 9.25))
    assert (m["coco_sentence_num"], m["coco_word_count"], m["gt_word_count"], m["n_errors"]) == (3, 4, 10, 1)
    assert len(judge.requests) == 1 + 1 + 2 + 4
    first = judge.requests[0]
    assert [role for role, _ in first.messages] == ["system"]
    assert (first.temperature, first.max_tokens) == (0.2, 512)
    assert first.messages[0][1] == template.replace("{question}", "Q").replace("{answer}", ANSWERS[0]["answer"][11:])
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["config"]["protocol"] == "paper" and results["nlp"]["lemmatizer"] == nlp.available_backend()


def test_paper_protocol_needs_the_published_table_and_prompt(coco):
    inst, _ = coco
    with pytest.raises(ValueError, match="utils.fetch objhal-synonyms"):
        evaluate_objhal(ANSWERS, inst)
    with pytest.raises(ValueError, match="utils.fetch prompt-objhal-extraction"):
        evaluate_objhal(ANSWERS, inst, synonyms_path=__file__, extractor=AttemptJudge({}))


def test_rule_extractor_counts_every_occurrence(coco, table):
    """Without a judge, the published script reads the answer like a caption: "a dog ... the dog" is two
    mentions (no de-duplication), "men" no mention. Image 1 ground truth {person, dog, tv}: CHAIRi 0."""
    inst, caps = coco
    ans = [{"id": 1, "image_id": 1, "answer": "A dog sees the dog and two men."}]
    res = evaluate_objhal(ans, inst, captions_path=caps, synonyms_path=table, extractor="rule")
    assert res["samples"][0]["mentions"] == [["dog", "dog"], ["dog", "dog"]]
    assert res["metrics"]["CHAIRi"] == 0.0 and res["metrics"]["obj_rec"] == pytest.approx(1 / 3)
