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


def test_divide_and_changeq_through_a_server(served) -> None:
    """divide --splitter-server: each answer's split prompt as one greedy request; the tiny model's reply is no fact
    list, so each record carries the parser's error (not a crash). A server that never answers (nothing listens on
    the port) fails each record alone, with the reason, and the stage completes."""
    import socket

    from muffin.feedback.changeq import main as changeq
    from muffin.feedback.divide import main as divide
    from muffin.feedback.stage import read_errors

    root, _, _, url = served
    answers = root / "answers_d.jsonl"
    recs = [{"answer_id": f"p#{k}", "prompt_id": "p", "question": "Describe.", "answer": "A red circle.", "error": None}
            for k in range(2)]  # fmt: skip
    answers.write_text("".join(json.dumps(r) + "\n" for r in recs))
    claims = root / "claims_d.jsonl"
    divide(["--answers", str(answers), "--out", str(claims), "--splitter-server", url, "--served-model", "tiny",
            "--max-new-tokens", "8"])  # fmt: skip
    out = read_jsonl(claims)
    assert len(out) == 2 and all(r["error"]["reason"].startswith("unparseable splitter output") for r in out)
    fp = json.loads((root / "claims_d.fingerprint.json").read_text())
    assert fp["splitter"]["name"] == "served:tiny"

    with socket.socket() as s:  # a free port with nothing behind it
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    questions = root / "questions_d.jsonl"
    claimed = root / "claimed_d.jsonl"
    claimed.write_text("".join(json.dumps({**r, "claims": ["A red circle."]}) + "\n" for r in recs))
    changeq(["--claims", str(claimed), "--out", str(questions), "--changeq-server", dead, "--served-model", "x",
             "--max-retries", "0", "--request-timeout", "5"])  # fmt: skip
    out = read_jsonl(questions)
    assert all("the server answered no text" in r["error"]["reason"] for r in out)
    assert len(read_errors(questions)) == 2


def test_pipeline_on_served_models(served) -> None:
    """The whole pipeline with the policy behind a server (and the labeler, by default, behind the same): the
    dataset is written, the answers and verdicts come through the server's request caches."""
    from muffin.feedback.pipeline import main as pipeline

    root, _, vocab, url = served
    wd = root / "pipe"
    pipeline(["--prompts", str(root / "world" / "feedback" / "prompts.jsonl"), "--image-root", str(root / "world"),
              "--policy", "tiny", "--policy-server", url, "--work-dir", str(wd), "--num-samples", "4",
              "--max-new-tokens", "8"])  # fmt: skip
    assert (wd / "answers.requests.sqlite").is_file() and (wd / "checked.requests.sqlite").is_file()
    checked = read_jsonl(wd / "checked.jsonl")
    assert len(checked) == 8 and all(r["policy"] == "tiny" for r in checked)
    assert (wd / "report" / "report.json").is_file()
