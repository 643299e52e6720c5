"""End-to-end runs of the feedback pipeline on CPU with tiny random models.

The tiny LLaVA is both policy and labeler (self-feedback); its answers are random text, so the tests check the
plumbing (counts, keys, order, schema, errors, resume, sharding), not the quality of the data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from muffin.feedback.pipeline import PipelineConfig, run_pipeline
from utils.io import read_jsonl

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = Path("data") / "rlaifv-original"


def _shapes_image(path: Path, colour: str, n: int) -> None:
    img = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(img)
    for i in range(n):
        draw.ellipse([10 + 25 * i, 30, 30 + 25 * i, 50], fill=colour)
    img.save(path)


def _prompt_file(tmp: Path, n: int = 3, bad: bool = True) -> Path:
    """``n`` generated shape images; with ``bad`` also a corrupt image file and a record with no question."""
    (tmp / "imgs").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        _shapes_image(tmp / "imgs" / f"s{i}.png", ["red", "blue", "green", "black"][i % 4], 1 + i % 3)
        lines.append(
            {
                "ds_question_id": f"shape{i}",
                "image_path": f"imgs/s{i}.png",
                "question": "Describe the image.",
                "metainfos": {"type": "synthetic"},
            }
        )
    if bad:
        (tmp / "imgs" / "corrupt.png").write_bytes(b"not a png at all")
        lines.append({"ds_question_id": "corrupt", "image_path": "imgs/corrupt.png", "question": "Describe."})
        lines.append({"ds_question_id": "noq", "image_path": "imgs/s0.png"})
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None) if k not in extra else None
    return env


def _generate_cmd(prompts: Path, policy: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "muffin.feedback.generate",
        "--prompts",
        str(prompts),
        "--image-root",
        str(prompts.parent),
        "--policy",
        str(policy),
        "--out",
        str(out),
        "--num-samples",
        "3",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
        "--seed",
        "7",
        *extra,
    ]


def test_pipeline_on_generated_images(tiny_llava, tmp_path):
    """3 good prompts x 3 answers; the corrupt image yields 3 failed answers, the question-less record an input
    error; every checked answer has one verdict per claim and score = -(#false); the parquet has the schema."""
    prompts = _prompt_file(tmp_path)
    cfg = PipelineConfig(
        prompts=str(prompts),
        policy=str(tiny_llava),
        work_dir=str(tmp_path / "work"),
        image_root=str(tmp_path),
        num_samples=3,
        max_new_tokens=12,
        seed=1,
        batch_size=4,
    )
    stats = run_pipeline(cfg, progress=False)
    answers = read_jsonl(cfg.path("answers"))
    assert [a["answer_id"] for a in answers] == [
        f"{p}#{k}" for p in ("shape0", "shape1", "shape2", "corrupt") for k in range(3)
    ]
    assert all(a["error"]["reason"].startswith("image unreadable") for a in answers[9:])
    errors = read_jsonl(tmp_path / "work" / "answers.errors.jsonl")
    assert {e["id"] for e in errors} == {"line5", "corrupt"}
    checked = read_jsonl(cfg.path("checked"))
    assert [c["answer_id"] for c in checked] == [a["answer_id"] for a in answers]
    for c in checked:
        if c["error"]:
            continue
        assert len(c["verdicts"]) == len(c["questions"]) == len(c["claims"]) == len(c["p_yes"])
        assert c["score"] == -sum(1 for y, n in zip(c["p_yes"], c["p_no"]) if not y > n)
    assert stats["answers"] == 12 and stats["answers_failed_by_stage"] == {"generate": 3}
    table = pq.read_table(cfg.path("dataset"))
    assert table.schema.names == [
        "ds_name",
        "image",
        "question",
        "chosen",
        "rejected",
        "origin_dataset",
        "origin_split",
        "idx",
        "image_path",
    ]
    balanced = read_jsonl(cfg.path("balanced"))
    assert table.num_rows == len(balanced)
    for row in table.to_pylist():
        assert json.loads(row["origin_split"]) == {
            "model": tiny_llava.name,
            "feedback_model": tiny_llava.name,
            "type": "synthetic",
        }
        assert row["image"]["bytes"] == (tmp_path / row["image_path"]).read_bytes()
    assert (tmp_path / "work" / "report" / "lengths.png").stat().st_size > 0


def test_pipeline_on_the_30_example_prompts(tiny_llava, reference_dir, tmp_path):
    """The published 30-prompt example with its photographs (paths relative to the original repo root)."""
    src = reference_dir / EXAMPLES / "examples" / "detail_test_30_input.jsonl"
    cfg = PipelineConfig(
        prompts=str(src),
        policy=str(tiny_llava),
        work_dir=str(tmp_path / "work"),
        image_root=str(reference_dir / EXAMPLES),
        num_samples=2,
        max_new_tokens=4,
        batch_size=10,
        labeler_batch_size=32,
    )
    stats = run_pipeline(cfg, progress=False)
    answers = read_jsonl(cfg.path("answers"))
    assert len(answers) == 60 and not any(a["error"] and a["answer"] is None for a in answers)
    assert stats["prompts"] == 30
    rows = pq.read_table(cfg.path("dataset")).to_pylist()
    for row in rows:
        assert Image.open(__import__("io").BytesIO(row["image"]["bytes"])).size[0] > 0
        assert row["image_path"].startswith("./examples/")


def test_llm_backends_record_unparseable_output(tmp_path):
    """A random tiny chat LM writes garbage: each answer either parses or is recorded in the errors file with the
    raw output; changeq never silently truncates (count mismatch or unparseable is an error)."""
    from muffin.feedback.changeq import ChangeqConfig, run_changeq
    from muffin.feedback.divide import DivideConfig, run_divide
    from utils.chat_lm.hf import HFChatLM, build_tiny_chat_lm

    lm = HFChatLM.from_pretrained(build_tiny_chat_lm(tmp_path / "lm"), device="cpu")
    answers = [
        {"answer_id": f"p#{k}", "prompt_id": "p", "question": "Describe.", "answer": f"A cat {k}.", "error": None}
        for k in range(3)
    ]
    claims = run_divide(
        answers, tmp_path / "claims.jsonl", DivideConfig("tiny", max_new_tokens=12), lm=lm, progress=False
    )
    errors = {e["id"]: e for e in read_jsonl(tmp_path / "claims.errors.jsonl")}
    assert errors, "the random LM's output should exercise the unparseable path"
    for c in claims:
        if c["error"]:
            assert (
                errors[c["answer_id"]]["reason"].startswith("unparseable") and "divide_raw" in errors[c["answer_id"]]
            )
        else:
            assert isinstance(c["claims"], list)
    fake = [{**a, "claims": ["The cat is black.", "There is a dog."]} for a in answers]
    questions = run_changeq(
        fake, tmp_path / "q.jsonl", ChangeqConfig("tiny", max_new_tokens=12), lm=lm, progress=False
    )
    for q in questions:
        assert (q["error"] is not None) or len(q["questions"]) == 2
        if q["error"]:
            assert q["questions"] is None and "changeq_raw" in q


@pytest.mark.slow  # two fresh interpreters load torch: ~30 s on 2 CPU cores
def test_two_ranks_match_one(tiny_llava, tmp_path):
    """generate on RANK 0/1 of WORLD_SIZE 2 (two CPU processes) merges to the same file as one process."""
    prompts = _prompt_file(tmp_path, n=4, bad=False)
    single = tmp_path / "one" / "answers.jsonl"
    subprocess.run(_generate_cmd(prompts, tiny_llava, single), env=_env(), check=True, capture_output=True)
    double = tmp_path / "two" / "answers.jsonl"
    procs = [
        subprocess.Popen(
            _generate_cmd(prompts, tiny_llava, double),
            env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-2000:]
    assert double.read_text() == single.read_text()
    assert len(read_jsonl(double)) == 12 and not list(double.parent.glob("*.rank*"))


@pytest.mark.slow  # three fresh interpreters: ~30 s on 2 CPU cores
def test_kill_and_resume_loses_and_duplicates_nothing(tiny_llava, tmp_path):
    """Kill generate once a few answers are on disk, rerun the same command: every answer exactly once, and the
    same answers as an uninterrupted run (per-answer seeds)."""
    prompts = _prompt_file(tmp_path, n=4, bad=False)
    out = tmp_path / "killed" / "answers.jsonl"
    cmd = _generate_cmd(prompts, tiny_llava, out, "--batch-size", "1", "--max-new-tokens", "24")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    partial = out.read_text().count("\n")
    assert 0 < partial < 12, "the run must be killed mid-way for this test to mean anything"
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    ids = [r["answer_id"] for r in read_jsonl(out)]
    assert ids == [f"shape{i}#{k}" for i in range(4) for k in range(3)]
    ref = tmp_path / "ref" / "answers.jsonl"
    subprocess.run(
        _generate_cmd(prompts, tiny_llava, ref, "--batch-size", "4", "--max-new-tokens", "24"),
        env=_env(),
        check=True,
        capture_output=True,
    )
    assert [r["answer"] for r in read_jsonl(out)] == [r["answer"] for r in read_jsonl(ref)]


def test_conquer_batches_across_prompts_give_the_same_verdicts(tiny_llava, tmp_path):
    """Scoring several prompts' questions in one labeler call (any batch size) gives each answer the P(yes), P(no)
    and verdicts that scoring its prompt alone gives."""
    from muffin.family import load_family
    from muffin.feedback.autocheck import AutocheckConfig, run_autocheck
    from muffin.feedback.records import load_prompts

    prompts_file = _prompt_file(tmp_path, n=4, bad=False)
    cfg = PipelineConfig(
        prompts=str(prompts_file),
        policy=str(tiny_llava),
        work_dir=str(tmp_path / "work"),
        image_root=str(tmp_path),
        num_samples=3,
        max_new_tokens=12,
        seed=2,
        batch_size=4,
    )
    run_pipeline(cfg, progress=False)
    questions = read_jsonl(cfg.path("questions"))
    prompts, _ = load_prompts(str(prompts_file), str(tmp_path))
    labeler = load_family(tiny_llava, device="cpu")
    runs = {}
    for b in (1, 5, 1000):
        out = run_autocheck(
            labeler,
            questions,
            prompts,
            tmp_path / f"checked_{b}.jsonl",
            AutocheckConfig(labeler="t", batch_size=b),
            progress=False,
        )
        runs[b] = {r["answer_id"]: r for r in out}
    reference = {r["answer_id"]: r for r in read_jsonl(cfg.path("checked"))}  # the pipeline: the default batch
    assert (
        len({r["prompt_id"] for r in reference.values()}) == 4
        and sum(len(r["questions"]) for r in reference.values()) > 10
    )
    for b, got in runs.items():
        assert got.keys() == reference.keys()
        for k, r in got.items():
            assert r["verdicts"] == reference[k]["verdicts"], (b, k)
            assert r["p_yes"] == pytest.approx(reference[k]["p_yes"], abs=1e-5)
            assert r["p_no"] == pytest.approx(reference[k]["p_no"], abs=1e-5)
