"""Reruns into an existing output: a changed setting is refused naming it, an edited input recomputes exactly the
records it feeds, --overwrite starts over, and the manifest states what made the records (issue 32 item 1).

Tiny random LLaVA policies on CPU; answers are random text, so the tests compare records, not their quality.
"""

from __future__ import annotations

import json

import pytest
from test_feedback_e2e import _prompt_file, _shapes_image

from muffin.decoding import CANDIDATE_SAMPLING
from muffin.family import load_family
from muffin.feedback import generate as gen
from muffin.feedback.autocheck import AutocheckConfig, run_autocheck
from muffin.feedback.divide import DivideConfig, run_divide
from muffin.feedback.generate import GenerateConfig, run_generate
from muffin.feedback.records import load_prompts
from muffin.feedback.stage import fingerprint_path, manifest_path
from utils.fingerprint import StaleOutputError, model_identity
from utils.io import read_jsonl


@pytest.fixture(scope="module")
def policy(tiny_llava):
    return load_family(tiny_llava, device="cpu")


@pytest.fixture(scope="module")
def other_policy(tmp_path_factory):
    from utils.tiny_models import build_tiny

    return build_tiny("llava", tmp_path_factory.mktemp("other-policy"), seed=1)


def _cfg(**kw) -> GenerateConfig:
    decoding = CANDIDATE_SAMPLING.replace(max_new_tokens=kw.pop("max_new_tokens", 5), temperature=kw.pop("t", 0.7))
    return GenerateConfig(num_samples=2, seed=kw.pop("seed", 0), batch_size=4, decoding=decoding, **kw)


class Counter:
    """Wraps ``muffin.feedback.generate.generate`` and records the questions it was asked to answer."""

    def __init__(self, monkeypatch) -> None:
        self.questions: list[str] = []
        real = gen.generate

        def counting(family, samples, *a, **kw):
            self.questions += [s.question for s in samples]
            return real(family, samples, *a, **kw)

        monkeypatch.setattr(gen, "generate", counting)


def test_generate_refuses_each_changed_setting_and_overwrite_starts_over(policy, tiny_llava, other_policy, tmp_path):
    prompts, _ = load_prompts(_prompt_file(tmp_path, n=2, bad=False), tmp_path)
    out = tmp_path / "answers.jsonl"
    first = run_generate(policy, prompts, out, _cfg(policy="p"), progress=False)
    assert run_generate(policy, prompts, out, _cfg(policy="p"), progress=False) == first  # same settings: resumes
    changes = {
        "seed": (dict(seed=1, policy="p"), "seed: 0 -> 1"),
        "temperature": (dict(t=0.9, policy="p"), "decoding.temperature: 0.7 -> 0.9"),
        "max-new-tokens": (dict(max_new_tokens=6, policy="p"), "decoding.max_new_tokens: 5 -> 6"),
        "policy name": (dict(policy="q"), "policy_name: 'p' -> 'q'"),
    }
    for name, (kw, said) in changes.items():
        with pytest.raises(StaleOutputError, match="--overwrite") as e:
            run_generate(policy, prompts, out, _cfg(**kw), progress=False)
        assert said in str(e.value), name
    other = model_identity(other_policy, family="llava", dtype="float32")
    with pytest.raises(StaleOutputError, match=r"policy\.weights: '[0-9a-f]{12}\.\.\.' -> '[0-9a-f]{12}\.\.\.'") as e:
        run_generate(policy, prompts, out, _cfg(policy="p"), model_id=other, progress=False)
    assert "policy.name" in str(e.value)  # the checkpoint directory's name changed too
    assert read_jsonl(out) == first  # refused reruns touched nothing
    again = run_generate(policy, prompts, out, _cfg(seed=1, policy="p"), overwrite=True, progress=False)
    assert [r["seed"] for r in again] != [r["seed"] for r in first]
    assert json.loads(fingerprint_path(out).read_text())["seed"] == 1


def test_edited_prompt_file_recomputes_exactly_the_edited_prompts(policy, tmp_path, monkeypatch):
    """shape0's question is edited and shape2's image repainted: their 2 + 2 answers are sampled again, shape1's
    two are kept byte for byte; a removed prompt's answers leave the output; a new prompt's are added."""
    path = _prompt_file(tmp_path, n=3, bad=False)
    out = tmp_path / "answers.jsonl"
    before = run_generate(policy, load_prompts(path, tmp_path)[0], out, _cfg(), progress=False)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[0]["question"] = "What colour are the shapes?"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    _shapes_image(tmp_path / "imgs" / "s2.png", "orange", 2)
    calls = Counter(monkeypatch)
    after = run_generate(policy, load_prompts(path, tmp_path)[0], out, _cfg(), progress=False)
    assert sorted(calls.questions) == sorted(["What colour are the shapes?"] * 2 + ["Describe the image."] * 2)
    assert [r for r in after if r["prompt_id"] == "shape1"] == [r for r in before if r["prompt_id"] == "shape1"]
    assert all(r["question"] == "What colour are the shapes?" for r in after if r["prompt_id"] == "shape0")
    changed = {r["answer_id"] for r in after if r["prompt_id"] in ("shape0", "shape2")}
    old = {r["answer_id"]: r["input_sha256"] for r in before}
    assert all(old[r["answer_id"]] != r["input_sha256"] for r in after if r["answer_id"] in changed)

    lines = lines[1:] + [{"ds_question_id": "new", "image_path": "imgs/s0.png", "question": "Anything?"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    calls.questions.clear()
    final = run_generate(policy, load_prompts(path, tmp_path)[0], out, _cfg(), progress=False)
    assert calls.questions == ["Anything?"] * 2
    assert [r["prompt_id"] for r in final] == ["shape1"] * 2 + ["shape2"] * 2 + ["new"] * 2
    assert read_jsonl(out) == final


def test_divide_recomputes_only_records_whose_answers_changed(tmp_path, monkeypatch):
    from muffin.feedback import divide as div

    answers = [
        {"answer_id": f"p#{k}", "prompt_id": "p", "question": "q", "answer": f"A cat {k}. A dog.", "error": None}
        for k in range(3)
    ]
    out = tmp_path / "claims.jsonl"
    run_divide(answers, out, DivideConfig(), progress=False)
    seen: list[str] = []
    real = div.split_claims_rule
    monkeypatch.setattr(div, "split_claims_rule", lambda text: seen.append(text) or real(text))
    answers[1] = {**answers[1], "answer": "A red bus."}
    recs = run_divide(answers, out, DivideConfig(), progress=False)
    assert seen == ["A red bus."] and recs[1]["claims"] == ["A red bus."]


def test_autocheck_refuses_another_labeler_and_rechecks_a_replaced_image(
    policy, tiny_llava, other_policy, tmp_path, monkeypatch
):
    from muffin.feedback import autocheck as ac

    path = _prompt_file(tmp_path, n=2, bad=False)
    prompts = load_prompts(path, tmp_path)[0]
    questions = [
        {"answer_id": f"{p.id}#0", "prompt_id": p.id, "question": "q", "answer": "a", "claims": ["c"],
         "questions": ["Is there a red circle?"], "error": None}
        for p in prompts
    ]  # fmt: skip
    out = tmp_path / "checked.jsonl"
    cfg = AutocheckConfig(labeler="tiny", batch_size=4)
    first = run_autocheck(policy, questions, prompts, out, cfg, progress=False)
    other = model_identity(other_policy, family="llava", dtype="float32")
    with pytest.raises(StaleOutputError, match="labeler.weights"):
        run_autocheck(policy, questions, prompts, out, cfg, model_id=other, progress=False)
    with pytest.raises(StaleOutputError, match="labeler_name: 'tiny' -> 'other'"):
        run_autocheck(policy, questions, prompts, out, AutocheckConfig(labeler="other", batch_size=4), progress=False)
    with pytest.raises(StaleOutputError, match="question_template"):
        run_autocheck(
            policy,
            questions,
            prompts,
            out,
            AutocheckConfig(labeler="tiny", question_template="{question} Yes or no?", batch_size=4),
        )
    _shapes_image(tmp_path / "imgs" / "s1.png", "purple", 3)
    images: list = []
    real = ac.yes_no_probs
    monkeypatch.setattr(
        ac, "yes_no_probs", lambda lab, samples, **kw: images.extend(samples) or real(lab, samples, **kw)
    )
    again = run_autocheck(policy, questions, load_prompts(path, tmp_path)[0], out, cfg, progress=False)
    assert len(images) == 1 and images[0].image.getpixel((20, 40)) == (128, 0, 128)  # shape1's new image only
    assert again[0] == first[0]


def test_generate_cli_manifest_states_what_made_the_records(tiny_llava, tmp_path, capsys):
    """The CLI rerun with another --seed is refused before it loads anything into the output; the manifest's
    config and fingerprint are those of the records (the issue's 'manifest claims the new settings')."""
    from test_feedback_e2e import _generate_cmd

    prompts = _prompt_file(tmp_path, n=2, bad=False)
    out = tmp_path / "answers.jsonl"
    argv = _generate_cmd(prompts, tiny_llava, out)[3:]
    gen.main(argv)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["config"]["seed"] == 7 and manifest["fingerprint"]["seed"] == 7
    before = out.read_bytes()
    other = [*argv[: argv.index("--seed")], "--seed", "8"]
    with pytest.raises(StaleOutputError, match="seed: 7 -> 8"):
        gen.main(other)
    assert out.read_bytes() == before and json.loads(manifest_path(out).read_text()) == manifest
    gen.main([*other, "--overwrite"])
    assert json.loads(manifest_path(out).read_text())["fingerprint"]["seed"] == 8
    assert out.read_bytes() != before


def test_divide_refuses_an_edited_prompt_file(tmp_path):
    """The template's text is fingerprinted, not its path: editing the file in place is a change."""
    from utils.chat_lm.hf import HFChatLM, build_tiny_chat_lm

    lm = HFChatLM.from_pretrained(build_tiny_chat_lm(tmp_path / "lm"), device="cpu")
    template = tmp_path / "split.txt"
    template.write_text("Split: {question} {answer}\n### Facts:")
    answers = [{"answer_id": "p#0", "prompt_id": "p", "question": "q", "answer": "A cat.", "error": None}]
    cfg = DivideConfig("lm", str(template), None, 4, 2)
    run_divide(answers, tmp_path / "claims.jsonl", cfg, lm=lm, progress=False)
    run_divide(answers, tmp_path / "claims.jsonl", cfg, lm=lm, progress=False)  # unchanged: resumes
    template.write_text("Facts of: {question} {answer}\n### Facts:")
    with pytest.raises(StaleOutputError, match=r"splitter\.template_sha256"):
        run_divide(answers, tmp_path / "claims.jsonl", cfg, lm=lm, progress=False)
    with pytest.raises(StaleOutputError, match=r"splitter: .* -> 'rule'"):
        run_divide(answers, tmp_path / "claims.jsonl", DivideConfig(), progress=False)


def test_pipeline_rerun_with_another_policy_is_refused(tiny_llava, other_policy, tmp_path):
    from muffin.feedback.pipeline import PipelineConfig, run_pipeline

    prompts = _prompt_file(tmp_path, n=2, bad=False)
    kw = dict(image_root=str(tmp_path), num_samples=2, max_new_tokens=6, batch_size=4)
    work = str(tmp_path / "work")
    run_pipeline(PipelineConfig(prompts=str(prompts), policy=str(tiny_llava), work_dir=work, **kw), progress=False)
    answers = (tmp_path / "work" / "answers.jsonl").read_bytes()
    with pytest.raises(StaleOutputError, match=r"policy\.weights") as e:
        run_pipeline(
            PipelineConfig(prompts=str(prompts), policy=str(other_policy), work_dir=work, **kw), progress=False
        )
    assert "answers.jsonl was made with other" in str(e.value)
    assert (tmp_path / "work" / "answers.jsonl").read_bytes() == answers
    stats = run_pipeline(
        PipelineConfig(prompts=str(prompts), policy=str(other_policy), work_dir=work, overwrite=True, **kw),
        progress=False,
    )
    assert stats["answers"] == 4
    manifest = json.loads((tmp_path / "work" / "answers.manifest.json").read_text())
    assert manifest["config"]["policy"] == str(other_policy)
    assert manifest["fingerprint"]["policy"]["name"] == other_policy.name
