"""generate --policy-server and autocheck --labeler-server against a real HTTP server on a tiny LLaVA (muffin.serve):
the local stages' records, resumable, with the requests cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muffin.family import Sample, load_family
from muffin.feedback.autocheck import main as autocheck
from muffin.feedback.generate import main as generate
from muffin.feedback.served import ServedModel, served_yes_no_probs
from muffin.serve import start
from utils.io import read_jsonl


@pytest.fixture(scope="module")
def served(tiny_llava, tmp_path_factory):
    from muffin.world.build import main as build

    root = tmp_path_factory.mktemp("served")
    build(["--out", str(root / "world"), "--n-sft", "0", "--n-feedback", "2", "--n-val", "0", "--n-test", "0"])
    fam = load_family(tiny_llava, device="cpu")
    vocab = fam.model.get_output_embeddings().weight.shape[0]
    httpd = start(fam, "tiny", max_logprobs=vocab)
    yield root, fam, vocab, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_generate_and_autocheck_through_a_server(served) -> None:
    root, fam, vocab, url = served
    prompts = root / "world" / "feedback" / "prompts.jsonl"
    answers = root / "answers.jsonl"
    gen = ["--prompts", str(prompts), "--image-root", str(root / "world"), "--policy-server", url, "--out",
           str(answers), "--num-samples", "3", "--max-new-tokens", "8"]  # fmt: skip
    generate(gen)
    recs = read_jsonl(answers)
    assert [r["answer_id"] for r in recs] == [f"{p}#{k}" for p in ("world_2000000", "world_2000001") for k in range(3)]
    assert all(isinstance(r["answer"], str) and r["policy"] == "tiny" for r in recs if not r["error"])
    assert len({r["seed"] for r in recs if r["prompt_id"] == "world_2000000"}) == 1  # one request per prompt
    manifest = json.loads(Path(f"{answers.with_suffix('')}.manifest.json").read_text())
    assert manifest["config"]["served_model"] == "tiny" and manifest["config"]["requests"]["requests"] == 2
    generate(gen)  # resumed: every answer done, nothing sent
    assert read_jsonl(answers) == recs
    manifest = json.loads(Path(f"{answers.with_suffix('')}.manifest.json").read_text())
    assert manifest["config"]["requests"]["requests"] == 0

    questions = root / "questions.jsonl"
    qs = [{**r, "claims": ["x"], "questions": ["Is there a red circle?", "Is there a dog?"]} for r in recs]
    questions.write_text("".join(json.dumps(q) + "\n" for q in qs))
    checked = root / "checked.jsonl"
    autocheck(["--questions", str(questions), "--prompts", str(prompts), "--image-root", str(root / "world"),
               "--labeler-server", url, "--top-logprobs", str(vocab), "--out", str(checked)])  # fmt: skip
    out = read_jsonl(checked)
    img = load_image_of(root, recs[0])
    want = served_yes_no_probs(
        ServedModel([url], model="tiny"), [Sample(img, q) for q in qs[0]["questions"]], top_logprobs=vocab
    )
    first = out[0]
    assert first["p_yes"] == pytest.approx([w[0] for w in want], rel=1e-6)
    assert first["verdicts"] == [y > n for y, n in want] and first["score"] == -sum(not v for v in first["verdicts"])


def load_image_of(root: Path, rec: dict):
    from PIL import Image

    return Image.open(root / "world" / rec["image_path"]).convert("RGB")
