"""The answer stage on the tiny LLaVA checkpoint: answers per question, bad images recorded, resume, sharding."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from eval.answer import jsonl_questions, main, merge_shards, mmhal_questions, run_answers
from utils.io import read_jsonl


@pytest.fixture()
def questions(tmp_path):
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (32, 24), color).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    recs = [{"id": f"q{i}", "image": f"img{i}.png", "question": "What colour is the image?"} for i in range(3)]
    recs.insert(1, {"id": "bad", "image": "broken.png", "question": "?"})
    recs.append({"id": "missing", "image": "nowhere.png", "question": "?"})
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_answer_cli_resume_and_bad_images(tiny_llava, questions, tmp_path):
    out = tmp_path / "answers.jsonl"
    argv = [
        "--benchmark",
        "jsonl",
        "--questions",
        str(questions),
        "--image-root",
        str(tmp_path),
        "--model-path",
        str(tiny_llava),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
    ]
    main(argv)
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["q0", "bad", "q1", "q2", "missing"]
    assert all(isinstance(r["answer"], str) for r in recs if r["id"].startswith("q"))
    assert recs[1]["answer"] is None and "cannot decode image" in recs[1]["error"]
    assert recs[4]["answer"] is None and "nowhere.png" in recs[4]["error"]
    manifest = json.loads((tmp_path / "answers.jsonl.manifest.json").read_text())
    assert manifest["decoding"]["num_beams"] == 3 and manifest["decoding"]["max_new_tokens"] == 4  # chat decoding
    before = out.read_text()
    main(argv)  # resume: everything is done, nothing is regenerated or duplicated
    assert out.read_text() == before


def test_sharded_answers_merge_to_the_single_process_order(tiny_llava, questions, tmp_path, monkeypatch):
    """Two ranks answer every other question; the merge has the single-process order and greedy answers."""
    from muffin.family import load_family

    family = load_family(tiny_llava, device="cpu")
    qs = jsonl_questions(questions, tmp_path)
    decoding = family.chat_decoding.replace(max_new_tokens=4, num_beams=1)
    single = read_jsonl(run_answers(family, qs, tmp_path / "single.jsonl", decoding=decoding, progress=False))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        shard = run_answers(family, qs, tmp_path / "multi.jsonl", decoding=decoding, progress=False)
        assert shard.name == f"multi.rank{rank}-of-2.jsonl"
    assert merge_shards(tmp_path / "multi.jsonl", qs, 2) == 5
    merged = read_jsonl(tmp_path / "multi.jsonl")
    assert [(r["id"], r["answer"]) for r in merged] == [(r["id"], r["answer"]) for r in single]


def test_mmhal_questions_find_images_by_source_name(reference_dir, tmp_path):
    template = reference_dir / "data" / "rlaifv-original" / "eval" / "mmhal-bench_answer_template.json"
    first = json.loads(template.read_text())[0]
    Image.new("RGB", (8, 8)).save(tmp_path / first["image_src"].rsplit("/", 1)[-1])
    qs = mmhal_questions(template, tmp_path)
    assert len(qs) == 96 and qs[0]["image"] == str(tmp_path / first["image_src"].rsplit("/", 1)[-1])
    assert qs[1]["image"].startswith("http")  # not supplied: left as the URL, reported per question when answering


def test_rerun_refuses_another_model_or_decoding_and_reanswers_edited_questions(
    tiny_llava, questions, tmp_path, monkeypatch
):
    """The issue's case: --model-path of another checkpoint into the same --out kept the old answers. Now it is
    refused (so are other decoding flags); an edited question is answered again, alone; --overwrite starts over."""
    import eval.answer as answer_mod
    from utils.fingerprint import StaleOutputError
    from utils.tiny_models import build_tiny

    other = build_tiny("llava", tmp_path / "other", seed=1)
    out = tmp_path / "answers.jsonl"
    argv = ["--benchmark", "jsonl", "--questions", str(questions), "--image-root", str(tmp_path)]
    argv += ["--out", str(out), "--max-new-tokens", "4", "--num-beams", "1", "--batch-size", "2"]
    main([*argv, "--model-path", str(tiny_llava)])
    before = read_jsonl(out)
    with pytest.raises(StaleOutputError, match=r"model\.weights") as e:
        main([*argv, "--model-path", str(other)])
    assert "model.name: 'tiny-llava0' -> 'other'" in str(e.value)
    with pytest.raises(StaleOutputError, match=r"decoding\.max_new_tokens: 4 -> 5"):
        main([*argv, "--model-path", str(tiny_llava), "--max-new-tokens", "5"])
    assert read_jsonl(out) == before

    recs = [json.loads(x) for x in questions.read_text().splitlines()]
    recs[2]["question"] = "Is it green?"  # q1
    questions.write_text("".join(json.dumps(r) + "\n" for r in recs))
    asked: list[str] = []
    real = answer_mod.call_per_record
    monkeypatch.setattr(
        answer_mod, "call_per_record", lambda fn, items: asked.extend(s.question for s in items) or real(fn, items)
    )
    main([*argv, "--model-path", str(tiny_llava)])
    assert asked == ["Is it green?"]
    after = read_jsonl(out)
    assert [r["id"] for r in after] == [r["id"] for r in before]  # replaced in place, no duplicate
    assert [r for r in after if r["id"] != "q1"] == [r for r in before if r["id"] != "q1"]
    main([*argv, "--model-path", str(other), "--overwrite"])
    manifest = json.loads((tmp_path / "answers.jsonl.manifest.json").read_text())
    assert manifest["config"]["model_path"] == str(other) and manifest["fingerprint"]["model"]["name"] == "other"


def test_an_over_long_question_fails_alone(tiny_llava, questions, tmp_path):
    """A 20,000-word question (the issue's) in a batch of 2: its neighbour is answered, it gets answer null, the
    error naming the model's context, and a line in the errors file with the limit (the tiny LLaVA's 512)."""
    recs = [json.loads(x) for x in questions.read_text().splitlines()]
    recs[0]["question"] = "word " * 20000
    questions.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "answers.jsonl"
    argv = ["--benchmark", "jsonl", "--questions", str(questions), "--image-root", str(tmp_path), "--out", str(out)]
    main([*argv, "--model-path", str(tiny_llava), "--max-new-tokens", "3", "--num-beams", "1", "--batch-size", "2"])
    got = {r["id"]: r for r in read_jsonl(out)}
    assert got["q0"]["answer"] is None and "over the model's context of 512" in got["q0"]["error"]
    assert all(isinstance(got[k]["answer"], str) for k in ("q1", "q2"))
    errors = {e["id"]: e for e in read_jsonl(tmp_path / "answers.errors.jsonl")}
    assert set(errors) == {"q0", "bad", "missing"} and errors["q0"]["limit"] == 512
