"""AMBER scoring on the published annotation files (../shared/reference/amber/data), expected numbers derived by hand
from the annotations quoted in each docstring and the official scorer's rules (junyangwang0410/AMBER inference.py).

Facts of the published files used below: annotations.json has ids 1..15220; ids 1-1004 generative. Discriminative
truths: existence (discriminative-hallucination) 4924, all "no"; attribute state 4764, number 2072, action 792,
each half "yes" half "no"; relation 1664 = 975 "discriminative-relation" (all "yes") + 689 "relation" (all "no").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.amber import AmberData, evaluate_amber, main
from eval.amber_nlp import OfficialNLP, OfflineNLP, is_noun
from eval.answer import amber_questions


@pytest.fixture(scope="module")
def amber_dir(reference_dir: Path) -> Path:
    path = reference_dir / "amber" / "data"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module")
def offline() -> OfflineNLP:
    return OfflineNLP()


# id 1: truth sky, forest, grass, person, lake, mountain, road; hallu cloud, sun, bird, dog, flower.
# id 2: truth sky, man, ship, ship, forest, bridge, mountain, cloud, lake, building; hallu plane, bird, sun, paddle,
#       ground.  id 3: truth child, grass, flower; hallu sky, cloud, tree, house, bench.
DESCRIPTIONS = {
    1: "A man walks on a road by a lake. Tall trees and a dog stand near the mountain under the sky, with a bird "
    "and a bench.",
    2: "Two boats sail on the river below a bridge; a person stands on the ground.",
    3: "A girl with a camera picks flowers on the grass.",
}


def test_generative_scores_on_published_annotations(amber_dir: Path, offline: OfflineNLP) -> None:
    """relation.json used: person <- man; forest <- tree; ship <- boat; lake <- river; man <- person;
    child <- girl; bird -> bill; "camera" is a safe word.

    id 1 objects: man, road, lake, tree, dog, mountain, sky, bird, bench (9). man covers person, tree covers forest;
      road, lake, mountain, sky cover themselves -> cover 6/7 (grass missed). dog and bird are hallucination
      targets (Cog 2/5) and hallucinations; bench is in no list: a hallucination. CHAIR 3/9.
    id 2 objects: boat, river, bridge, person, ground (5). boat covers the FIRST "ship" only, river covers lake,
      person covers man, bridge itself -> cover 4/10 (the second "ship" can never be covered). ground is a target
      (Cog 1/5) and a hallucination. CHAIR 1/5.
    id 3 objects: girl, camera, flower, grass (4): camera is skipped (safe word, still counted in CHAIR's
      denominator), the others cover child, flower, grass -> cover 3/3, no hallucination, Cog 0/5.
    Totals: CHAIR 4/18 = 2/9, Cover 13/20, Hal 2/3, Cog 3/15 = 1/5.
    Official printout (counters start at 0.001): CHAIR 4/18.001 -> 22.2, Cover 13/20.001 -> 65.0,
    Hal 100 - 100/3.001 -> 66.7, Cog 3/15.001 -> 20.0.
    """
    answers = [{"id": k, "answer": v} for k, v in DESCRIPTIONS.items()]
    res = evaluate_amber(answers, amber_dir, nlp=offline)
    s1, s2, s3 = res["samples"]
    assert s1["objects"] == ["man", "road", "lake", "tree", "dog", "mountain", "sky", "bird", "bench"]
    assert s1["hallucinated"] == ["dog", "bird", "bench"]
    assert s1["truth_covered"] == ["sky", "forest", "person", "lake", "mountain", "road"]
    assert s1["hallu_covered"] == ["bird", "dog"]
    assert s2["objects"] == ["boat", "river", "bridge", "person", "ground"]
    assert s2["counts"] == {"chair": [1, 5], "cover": [4, 10], "cog": [1, 5], "hal": [1, 1]}
    assert s2["truth_covered"] == ["man", "ship", "bridge", "lake"]
    assert s3["counts"] == {"chair": [0, 4], "cover": [3, 3], "cog": [0, 5], "hal": [0, 1]}
    g = res["metrics"]["generative"]
    assert g["chair"] == pytest.approx(2 / 9) and g["cover"] == pytest.approx(0.65)
    assert g["hal"] == pytest.approx(2 / 3) and g["cog"] == pytest.approx(0.2) and g["n"] == 3
    assert res["metrics"]["official"]["generative"] == {"CHAIR": 22.2, "Cover": 65.0, "Hal": 66.7, "Cog": 20.0}
    assert "discriminative" not in res["metrics"]


class TableSimilarity(OfflineNLP):
    """The offline nouns with a similarity given as a table of (noun, word) pairs: the official branch's logic
    (which object a similar word covers) tested without spaCy's vectors."""

    name = "table"

    def __init__(self, pairs: set[tuple[str, str]]) -> None:
        super().__init__()
        self.pairs = pairs

    def similar(self, a: str, b: str) -> bool:
        return a == b or (a, b) in self.pairs


def test_similar_words_cover_and_spare(amber_dir: Path) -> None:
    """id 3 (truth child, grass, flower; hallu sky, cloud, tree, house, bench; relation.json: bench -> chair,
    armrest) with "stool" similar to "bench" and "rug" similar to "grass":
    kid covers child (relation.json child -> kid). stool names no listed word exactly; it is similar to the target
    bench -> Cog 1/5, and to no true object's word -> a hallucination. rug is similar to grass -> covers grass and
    is no hallucination. CHAIR 1/3, cover 2/3, Hal 1.
    """
    nlp = TableSimilarity({("stool", "bench"), ("rug", "grass")})
    s = evaluate_amber([{"id": 3, "answer": "A kid sits on a stool by a rug."}], amber_dir, nlp=nlp)["samples"][0]
    assert s["objects"] == ["kid", "stool", "rug"]
    assert s["hallucinated"] == ["stool"]
    assert s["truth_covered"] == ["child", "grass"] and s["hallu_covered"] == ["bench"]


def test_discriminative_all_no_on_published_annotations(amber_dir: Path) -> None:
    """Every discriminative query (ids 1005..15220) answered "No." ("no" is the positive class):
    overall: 14216 answers, 9427 truths "no" (4924 + 3814 + 689) -> accuracy = precision = 9427/14216, recall 1,
      F1 = 2p/(p+1). Official: 9427/14216.001 -> 66.3; recall 9427/9427.001 -> 100.0; F1 from the rounded values
      2*0.663/(1.663+0.0001) -> 79.7.
    existence: all "no" -> 1, 1, 1, 1; official 100.0 each (F1 2/2.001 -> 100.0).
    attribute: 7628, half "no" -> accuracy = precision 0.5, recall 1, F1 2/3; official 3814/7628.003 -> 50.0,
      F1 2*0.5/1.5001 -> 66.7 (state, number, action alike).
    relation: 1664, 689 "no" -> accuracy = precision 689/1664 = 0.4140625, recall 1; official 41.4, F1
      2*0.414/1.4141 -> 58.6.
    """
    answers = [{"id": i, "answer": "No."} for i in range(1005, 15221)]
    m = evaluate_amber(answers, amber_dir, nlp=_no_nlp())["metrics"]
    d, off = m["discriminative"], m["official"]
    assert d["overall"]["n"] == 14216 and d["overall"]["counts"]["truth_no"] == 9427
    assert d["overall"]["accuracy"] == pytest.approx(9427 / 14216) == d["overall"]["precision"]
    assert d["overall"]["recall"] == 1.0
    assert off["overall"] == {"Accuracy": 66.3, "Precision": 66.3, "Recall": 100.0, "F1": 79.7}
    assert off["existence"] == {"Accuracy": 100.0, "Precision": 100.0, "Recall": 100.0, "F1": 100.0}
    for name, n in (("attribute", 7628), ("state", 4764), ("number", 2072), ("action", 792)):
        assert d[name]["n"] == n and d[name]["accuracy"] == 0.5 and d[name]["f1"] == pytest.approx(2 / 3)
        assert off[name] == {"Accuracy": 50.0, "Precision": 50.0, "Recall": 100.0, "F1": 66.7}
    assert d["relation"]["n"] == 1664 and d["relation"]["accuracy"] == 0.4140625
    assert off["relation"] == {"Accuracy": 41.4, "Precision": 41.4, "Recall": 100.0, "F1": 58.6}
    assert "generative" not in m and "AMBER_score" not in off


def test_yes_no_rules(amber_dir: Path) -> None:
    """id 1005 (state, truth yes) and the first existence id (truth no), read with POPE's rule: "Yes, it is sunny."
    -> Yes (right), "There is no fish." -> No (right). Under ``exact`` only "Yes"/"No" themselves count: "no" is neither (wrong, and not
    an answered "no"), as in the official script."""
    ann = json.loads((amber_dir / "annotations.json").read_text())
    no_id = next(a["id"] for a in ann if a["type"] == "discriminative-hallucination")  # existence: truth "no"
    free = [{"id": 1005, "answer": "Yes, it is sunny."}, {"id": no_id, "answer": "There is no fish."}]
    d = evaluate_amber(free, amber_dir, nlp=_no_nlp())["metrics"]["discriminative"]["overall"]
    assert d["counts"] == {"correct": 2, "truth_no": 1, "answered_no": 1, "no_correct": 1}
    strict = [{"id": 1005, "answer": "Yes"}, {"id": no_id, "answer": "no"}]
    d = evaluate_amber(strict, amber_dir, nlp=_no_nlp(), yes_no="exact")["metrics"]["discriminative"]["overall"]
    assert d["counts"] == {"correct": 1, "truth_no": 1, "answered_no": 0, "no_correct": 0}
    assert d["precision"] is None and d["recall"] == 0.0


def test_offline_noun_rule() -> None:
    assert not is_noun("clouds can be seen".split(), 1, "can")
    assert is_noun("a can of soda".split(), 1, "can")
    assert not is_noun("people are sailing".split(), 2, "sailing")
    assert is_noun("the building".split(), 1, "building")
    assert is_noun("tall buildings".split(), 1, "building")  # plural: a noun whatever precedes it
    assert not is_noun("they ski".split(), 1, "ski")
    assert not is_noun("a tool that can be used".split(), 3, "can")  # "that" is no article here
    assert is_noun("an oil painting".split(), 2, "painting") and not is_noun("a man painting".split(), 2, "painting")
    assert not is_noun("a light blue shirt".split(), 1, "light")  # modifies a colour
    assert is_noun("the light from the window".split(), 1, "light")


def test_cli_official_list_format_resume_and_labels(amber_dir: Path, tmp_path: Path) -> None:
    """The official response format (a JSON list of id/response), the offline label in results.json, and a rerun
    that rescores only a changed answer: id 3 first as DESCRIPTIONS[3] (no hallucination), then "A bench." (bench
    is a target: hallucinated)."""
    answers = tmp_path / "responses.json"
    answers.write_text(json.dumps([{"id": 3, "response": DESCRIPTIONS[3]}, {"id": 1005, "response": "Yes"}]))
    out = tmp_path / "out"
    main(["--answers", str(answers), "--data-dir", str(amber_dir), "--out-dir", str(out), "--nlp", "offline"])
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "amber" and results["judge"] is None
    assert results["config"]["nlp_backend"] == "offline" and results["protocol"].startswith("offline")
    assert results["metrics"]["generative"]["hal"] == 0.0
    assert (
        results["metrics"]["official"]["generative"]["Hal"] == 0.1
    )  # 100 - 1/1.001*100 = 0.0999: metrics.txt's 0.001
    answers.write_text(json.dumps([{"id": 3, "response": "A bench."}, {"id": 1005, "response": "Yes"}]))
    main(["--answers", str(answers), "--data-dir", str(amber_dir), "--out-dir", str(out), "--nlp", "offline"])
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["generative"]["hal"] == 1.0
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [3, 1005] and lines[0]["hallucinated"] == ["bench"]


def test_errors_name_the_record(amber_dir: Path) -> None:
    with pytest.raises(ValueError, match="record 1 repeats id 7"):
        evaluate_amber([{"id": 7, "answer": "x"}, {"id": 7, "answer": "y"}], amber_dir, nlp=_no_nlp())
    res = evaluate_amber([{"id": 99999, "answer": "x"}, {"id": 8, "answer": None}], amber_dir, nlp=_no_nlp())
    assert res["metrics"]["n_errors"] == 2
    assert "not an AMBER annotation id" in res["samples"][0]["error"]
    with pytest.raises(FileNotFoundError, match="has no annotations.json"):
        AmberData.load(amber_dir.parent)


def test_official_backend_says_how_to_install() -> None:
    try:
        OfficialNLP()
    except RuntimeError as e:
        assert "en_core_web_lg" in str(e) and "averaged_perceptron_tagger" in str(e)
    else:
        pytest.skip("NLTK data and en_core_web_lg are installed here")


def test_answer_stage_reads_query_files(amber_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "AMBER_1.jpg").write_bytes(b"")
    qs = amber_questions(amber_dir / "query" / "query_all.json", tmp_path)
    assert len(qs) == 15220
    assert qs[0] == {
        "id": 1,
        "question": "Describe this image.",
        "image_file": "AMBER_1.jpg",
        "image": str(tmp_path / "AMBER_1.jpg"),
    }
    assert qs[1004]["id"] == 1005 and qs[1004]["image_file"] == "AMBER_1.jpg"


def _no_nlp() -> TableSimilarity:
    return TableSimilarity(set())


def test_spacy_similarity_as_the_official_check() -> None:
    """``check_synonyms_word`` through a real spaCy pipeline whose vectors are set by hand (en_core_web_lg's are
    not available offline): Doc.similarity is the cosine of the mean token vectors, 1.0 for identical words and 0
    for a word without a vector. dog (1,0,0) vs puppy (0.9, sqrt(0.19), 0): cosine 0.9 > 0.8 -> similar; vs cat
    (0.5, sqrt(0.75), 0): 0.5 -> not; "e-book" is the tokens e, -, book, whose mean (0, 0, 1/3) points the way of
    ebook (0, 0, 1): cosine 1."""
    spacy = pytest.importorskip("spacy")
    import numpy as np

    from eval.amber_nlp import SpacySimilarity

    nlp = spacy.blank("en")
    vectors = {"dog": [1, 0, 0], "puppy": [0.9, 0.19**0.5, 0], "cat": [0.5, 0.75**0.5, 0], "book": [0, 0, 1]}
    for word, vec in {**vectors, "ebook": [0, 0, 1]}.items():
        nlp.vocab.set_vector(word, np.array(vec, dtype="float32"))
    similar = SpacySimilarity(nlp, 0.8)
    assert similar("dog", "puppy") and not similar("dog", "cat")
    assert similar("zebra", "zebra") and not similar("zebra", "dog")  # identical: 1.0; no vector: 0
    assert similar("e-book", "ebook")
    assert SpacySimilarity(nlp, 0.95)("dog", "puppy") is False  # the threshold is strict: 0.9 is not > 0.95


def test_checkpoint_evaluated_on_amber(amber_dir: Path, tiny_llava: Path, tmp_path: Path) -> None:
    """The loop's AMBER benchmark: a tiny random model answers a description query (id 1) and a yes/no one
    (id 1005); the loop's metrics are eval.amber's, with AMBER's CHAIR / Hal / Cover under the CHAIR names."""
    from PIL import Image

    from muffin.loop import Benchmark, evaluate_checkpoint

    Image.new("RGB", (32, 32), "green").save(tmp_path / "AMBER_1.jpg")
    queries = tmp_path / "query.json"
    all_q = json.loads((amber_dir / "query" / "query_all.json").read_text())
    queries.write_text(json.dumps([q for q in all_q if q["id"] in (1, 1005)]))
    bench = Benchmark(
        str(queries), kind="amber", data_dir=str(amber_dir), image_root=str(tmp_path), decoding={"max_new_tokens": 6}
    )
    m = evaluate_checkpoint(str(tiny_llava), bench, tmp_path / "eval", batch_size=2)
    res = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert m["n_answers"] == 2 and m["amber_accuracy"] == res["discriminative"]["overall"]["accuracy"]
    assert m["chair_i"] == m["amber_chair"] == res["generative"]["chair"]
    assert m["recall"] == res["generative"]["cover"] and m["response_hallucination"] == res["generative"]["hal"]
