"""Score steps rerun into an existing --out-dir: other answers, judge model, prompt file or settings are refused
before any judge call, naming what changed; --overwrite starts over and results.json states what made the samples.

The judge is a counting stand-in built from --judge-model (``build_judge`` patched), so each test knows exactly how
many calls a rerun made: the issue's failure was "0 judge calls; results.json names the new judge".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.judges import JudgeResponse, JudgeStats
from utils.fingerprint import StaleOutputError


class CountingJudge:
    def __init__(self, model: str) -> None:
        self.id = f"fake:{model}"
        self.stats = JudgeStats()
        self.calls = 0

    def complete(self, requests, *, progress: bool = False):  # noqa: ANN001, ANN201
        self.calls += len(requests)
        return [JudgeResponse("Rating: 5") for _ in requests]


@pytest.fixture()
def judges(monkeypatch):
    import eval.mmhal as mmhal

    made: list[CountingJudge] = []

    def build(args, cache):  # noqa: ANN001, ANN202
        made.append(CountingJudge(args.judge_model))
        return made[-1]

    monkeypatch.setattr(mmhal, "build_judge", build)
    return made


def _mmhal_files(tmp: Path) -> tuple[Path, Path, Path]:
    items = [
        {"question_type": "attribute", "image_content": ["Cat"], "question": f"q{i}", "gt_answer": "g"}
        for i in range(3)
    ]
    (tmp / "template.json").write_text(json.dumps(items))
    (tmp / "answers.jsonl").write_text("".join(json.dumps({"id": i, "answer": f"ans {i}"}) + "\n" for i in range(3)))
    (tmp / "prompt.txt").write_text("Rate: {image_contents} {question} {standard_answer} {response}")
    return tmp / "template.json", tmp / "answers.jsonl", tmp / "prompt.txt"


def test_mmhal_rerun_refuses_new_answers_judge_and_prompt(tmp_path, judges):
    import eval.mmhal as mmhal

    template, answers, prompt = _mmhal_files(tmp_path)
    out = tmp_path / "out"
    argv = ["--answers", str(answers), "--template", str(template), "--prompt-file", str(prompt)]
    argv += ["--protocol", "ours", "--out-dir", str(out), "--judge-model", "m1"]
    mmhal.main(argv)
    assert judges[-1].calls == 3
    mmhal.main(argv)  # same everything: resumes, asks nothing
    assert judges[-1].calls == 0
    results = (out / "results.json").read_bytes()

    def refused(args: list[str], said: str) -> None:
        with pytest.raises(StaleOutputError, match="--overwrite") as e:
            mmhal.main(args)
        assert said in str(e.value) and judges[-1].calls == 0
        assert (out / "results.json").read_bytes() == results  # nothing rewritten

    refused([*argv[:-1], "m2"], "judge: 'fake:m1' -> 'fake:m2'")
    prompt.write_text("Rate it: {image_contents} {question} {standard_answer} {response}")
    refused(argv, "inputs.prompt_file.sha256")
    prompt.write_text("Rate: {image_contents} {question} {standard_answer} {response}")
    answers.write_text(answers.read_text().replace("ans 1", "a better answer"))
    refused(argv, "inputs.answers.sha256")
    refused([*argv, "--reasks", "5"], "settings.reasks: 2 -> 5")
    mmhal.main([*argv[:-1], "m2", "--overwrite"])
    assert judges[-1].calls == 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["judge"]["id"] == "fake:m2" and saved["fingerprint"]["judge"] == "fake:m2"
    assert (
        saved["fingerprint"]["inputs"]["answers"]["sha256"]
        != json.loads(results)["fingerprint"]["inputs"]["answers"]["sha256"]
    )


def test_objhal_rule_rerun_with_new_answers_is_refused(tmp_path):
    """The rule extractor (no judge): the answers file's content is fingerprinted like any input."""
    import eval.objhal as objhal

    cats = [{"id": 18, "name": "dog"}]
    inst = {"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "category_id": 18}], "categories": cats}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"id": "a", "image_id": 1, "question": "q", "answer": "A dog."}) + "\n")
    argv = ["--answers", str(answers), "--annotations", str(tmp_path / "inst.json"), "--protocol", "ours"]
    argv += ["--extractor", "rule", "--out-dir", str(tmp_path / "out")]
    objhal.main(argv)
    objhal.main(argv)
    answers.write_text(json.dumps({"id": "a", "image_id": 1, "question": "q", "answer": "A dog and a cat."}) + "\n")
    with pytest.raises(StaleOutputError, match="inputs.answers.sha256"):
        objhal.main(argv)
    with pytest.raises(StaleOutputError, match="settings.protocol: 'ours' -> 'paper'"):
        objhal.main([*argv[:5], "paper", *argv[6:]])
    objhal.main([*argv, "--overwrite"])
    sample = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["answer"] == "A dog and a cat."
