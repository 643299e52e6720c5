"""Judge-output parsers on hand-written messy outputs, and prompt-template filling (incl. the published texts)."""

from __future__ import annotations

import pytest

from eval.parsers import choice_score, parse_choice, parse_object_list, parse_rating
from utils.chat_lm.prompts import fill_template


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is accurate.\nRating: 5", 5),
        ("**Rating:** 6, very informative with good analysis", 6),
        ("Explanation ... rating = [4]", 4),
        ("The response hallucinates a second cat. Rating: 2/6", 2),
        ("I'd say the rating would be 3.", 3),
        ("Rating: 5 at first glance, but the count is wrong.\nRating: 1", 1),  # the last verdict wins
        ("Rating: 9 (out of range)", None),
        ("Rating: 4/10", None),  # another scale: not ours
        ("The response is fine.\n\n4", 4),  # a bare number as the last line
        ("No rating given, sorry.", None),
        ("", None),
        (None, None),
        # the judge only echoed the option list: no verdict
        (
            "- Rating: 6, a\n- Rating: 5, b\n- Rating: 4, c\n- Rating: 3, d\n- Rating: 2, e\n- Rating: 1, f\n- Rating: 0, g",
            None,
        ),
        # ... and echoed it, then concluded
        ("Options: Rating: 6 Rating: 5 Rating: 4 Rating: 3 Rating: 2 Rating: 1 Rating: 0\nMy verdict. Rating: 3", 3),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Model B has fewer hallucinations. [[B]]", "B"),
        ("Final verdict: **[[ a ]]**", "A"),
        ("Both are equally good: [[C]].", "C"),
        ("[[Model B]]", "B"),
        ('I must output "[[A]]" if A is better... Having compared, the answer is [[B]]', "B"),
        ('If Model A is better, output "[[A]]"; If Model B is better, output "[[B]]"; if equal, "[[C]]".', None),
        ('* same: "[[C]]"; * A fewer: "[[A]]"; * B fewer "[[B]]"', None),  # the hallucination prompt's order
        ("Model A is better [A]", None),
        ("[[D]]", None),
        (None, None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_choice_score_is_from_the_evaluated_model_b():
    assert [choice_score(c) for c in "ABC"] == [-1, 1, 0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('["dog", "frisbee", "person"]', ["dog", "frisbee", "person"]),
        ('```json\n["dog", "tree"]\n```', ["dog", "tree"]),
        ("Here are the objects: ['bus', 'traffic light',] that is all.", ["bus", "traffic light"]),
        ("()", []),
        ("[]", []),
        ("There are no visible objects, so I return an empty list ().", []),
        ("- cat\n- sofa\n", ["cat", "sofa"]),
        ('Objects [1] are: ["cup"]', ["cup"]),  # skips a bracket that holds no list of names
        ("I cannot help with that.", None),
        (None, None),
    ],
)
def test_parse_object_list(text, expected):
    assert parse_object_list(text) == expected


def test_fill_template_named_positional_and_errors():
    vals = {"question": "Q", "answer": "A"}
    assert fill_template('{question} -> {answer} as ["x"]', vals, [], where="t") == 'Q -> A as ["x"]'
    assert fill_template("{} then {}", vals, ["answer", "question"], where="t") == "A then Q"
    with pytest.raises(ValueError, match="bare '\\{\\}' slots"):
        fill_template("only {} one slot", vals, ["answer", "question"], where="my.txt")


def test_published_prompt_files_fill(reference_dir):
    """The published MMHal prompt has four bare {} slots; the object-extraction one has {question}/{answer}."""
    mmhal = (reference_dir / "prompts" / "mmhal_judge.txt").read_text()
    vals = {"image_contents": "Cat", "question": "How many?", "standard_answer": "Two.", "response": "One."}
    filled = fill_template(mmhal, vals, ["image_contents", "question", "standard_answer", "response"], where="m")
    assert "### Image Contents\nCat" in filled and filled.rstrip().endswith("### LMM Response to Evaluate\nOne.")
    objhal = (reference_dir / "prompts" / "objhal_object_extraction.txt").read_text()
    filled = fill_template(objhal, {"question": "Describe.", "answer": "A dog."}, [], where="o")
    assert "<image> Describe." in filled and "\nA dog.\n" in filled and "{answer}" not in filled
