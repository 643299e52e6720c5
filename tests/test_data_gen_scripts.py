"""The script/data_gen wrappers: named flags and the old environment variables reach the pipeline's stage knobs
through the one launcher (_data_gen_common.sh); --help says what each does; a work dir that the old per-stage
commands made resumes under the launcher without computing anything again."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from muffin.feedback.pipeline import PipelineConfig, make_parser
from utils.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["llava15_omni", "llava15_minicpmv", "self_feedback", "reward", "cpu_tiny"]


def _env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for name in ("PROMPTS", "IMAGE_ROOT", "POLICY", "LABELER", "WORK", "SEED", "NUM_SAMPLES", "NGPU", "SPLIT_PROMPT"):
        keep.pop(name, None)
    path = f"{Path(sys.executable).parent}{os.pathsep}{keep.get('PATH', '')}"  # `python` is this interpreter
    return {**keep, "PATH": path, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _script(name: str, *args: str, env: dict[str, str] | None = None, timeout: int = 60) -> str:
    res = subprocess.run(["bash", str(REPO / "script" / "data_gen" / f"run_data_pipeline_{name}.sh"), *args],
                         cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _planned(name: str, *args: str, **env: str) -> PipelineConfig:
    """The config the script's pipeline command (``--dry-run``) builds, read by the pipeline's own parser."""
    out = _script(name, "--dry-run", *args, env=_env(NGPU="1", **env)).strip().splitlines()
    cmd = shlex.split(next(line for line in out if "muffin.feedback.pipeline" in line))
    assert cmd[:3] == ["python", "-m", "muffin.feedback.pipeline"], cmd
    return PipelineConfig(**vars(make_parser().parse_args(cmd[3:])))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_says_what_and_lists_the_flags(name):
    out = _script(name, "--help")
    assert out.startswith("# ") and "bash script/data_gen/" in out
    for flag in ("--prompts", "--policy", "--work", "--num-samples", "--gpus", "--dry-run"):
        assert flag in out, (name, flag)


def test_flags_and_variables_reach_the_stage_knobs(tmp_path):
    """A flag beats its variable, a variable beats the wrapper's default, other flags pass through, and the
    released split prompt (a model splitter only) comes with the 300-word cut."""
    prompt = tmp_path / "split.txt"
    prompt.write_text("{question} {answer}")
    cfg = _planned(
        "llava15_omni",
        "--policy", "pol", "--work", str(tmp_path / "w"), "--num-samples", "3", "--seed", "5", "--batch-size", "7",
        "--splitter", "split-model", "--splitter-prompt", str(prompt), "--changeq", "rule", "--max-pairs", "4",
        "--score", "expected", "--min-diff", "0.5",
        SEED="9", QUESTION_TYPE="qt", LABELER="lab", MAX_NEW_TOKENS="33",
    )  # fmt: skip
    assert (cfg.policy, cfg.labeler, cfg.work_dir) == ("pol", "lab", str(tmp_path / "w"))
    assert (cfg.num_samples, cfg.seed, cfg.batch_size, cfg.max_new_tokens) == (3, 5, 7, 33)
    assert (cfg.question_type, cfg.max_pairs, cfg.score, cfg.min_diff) == ("qt", 4, "expected", 0.5)
    assert (cfg.splitter, cfg.splitter_prompt_file, cfg.splitter_max_prompt_words) == ("split-model", str(prompt), 300)
    assert (cfg.changeq, cfg.changeq_prompt_file) == ("rule", None)  # the rules read no prompt
    assert cfg.prompts == "data/prompts/rlaifv_prompts.jsonl" and cfg.feedback == "claims"

    self_fb = _planned("self_feedback", "--policy", "p12", "--splitter-prompt", "", "--changeq-prompt", "")
    assert self_fb.labeler == "p12" and self_fb.splitter_prompt_file is None  # the policy labels itself
    assert _planned(
        "llava15_minicpmv", "--trust-remote-code", "--splitter", "rule", "--changeq", "rule"
    ).trust_remote_code

    reward = _planned("reward", "--reward-model", "aligned", "--top-k", "2", "--max-word-gap", "40", NUM_SAMPLES="4")
    assert (reward.feedback, reward.reward_model, reward.reward_reference) == ("reward", "aligned", "checkpoints/llava-v1.5-7b")  # fmt: skip
    assert (reward.reward_top_k, reward.reward_max_word_gap, reward.num_samples) == (2, 40, 4)

    tiny = _planned("cpu_tiny", str(tmp_path / "dry"), "--num-samples", "2")
    assert tiny.work_dir == str(tmp_path / "dry" / "data") and tiny.num_samples == 2 and tiny.device == "cpu"


def _prompts(tmp: Path) -> Path:
    rows = []
    for i, colour in enumerate(["red", "blue", "green"]):
        img = Image.new("RGB", (60, 45), "white")
        ImageDraw.Draw(img).ellipse([5 + 10 * i, 10, 25 + 10 * i, 30], fill=colour)
        img.save(tmp / f"s{i}.png")
        rows.append({"ds_question_id": f"s{i}", "image_path": f"s{i}.png", "question": "Describe the image."})
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_work_dir_of_the_old_per_stage_commands_resumes(tiny_llava, tmp_path):
    """The old scripts ran generate, divide, changeq and autocheck as separate commands; the launcher's pipeline on
    that work dir with the same settings accepts their fingerprints (no StaleOutputError), computes none of their
    records again (their files keep their bytes), and makes the pairs, dataset and report; the flags are in the manifests."""
    from muffin.feedback import autocheck, changeq, divide, generate

    prompts, work = _prompts(tmp_path), tmp_path / "work"
    common = ["--prompts", str(prompts), "--image-root", str(tmp_path)]
    generate.main([*common, "--policy", str(tiny_llava), "--out", str(work / "answers.jsonl"), "--num-samples", "2",
                   "--temperature", "0.7", "--max-new-tokens", "6", "--seed", "3", "--batch-size", "4",
                   "--device", "cpu"])  # fmt: skip
    divide.main(["--answers", str(work / "answers.jsonl"), "--out", str(work / "claims.jsonl"), "--splitter", "rule"])
    changeq.main(["--claims", str(work / "claims.jsonl"), "--out", str(work / "questions.jsonl"), "--changeq", "rule"])
    autocheck.main([*common, "--questions", str(work / "questions.jsonl"), "--labeler", str(tiny_llava),
                    "--out", str(work / "checked.jsonl"), "--device", "cpu"])  # fmt: skip
    made = {f: (work / f).read_bytes() for f in ("answers.jsonl", "claims.jsonl", "questions.jsonl", "checked.jsonl")}

    log = _script("llava15_omni", "--prompts", str(prompts), "--image-root", str(tmp_path), "--policy", str(tiny_llava),
            "--labeler", str(tiny_llava), "--splitter", "rule", "--changeq", "rule", "--work", str(work),
            "--num-samples", "2", "--max-new-tokens", "6", "--seed", "3", "--batch-size", "4", "--question-type", "qt",
            "--max-pairs", "1", "--device", "cpu", env=_env(NGPU="1"), timeout=600)  # fmt: skip
    assert {f: (work / f).read_bytes() for f in made} == made
    for done in ("generate: 0 answers to sample", "divide: 0 records to process", "changeq: 0 records to process",
                 "autocheck: 0 prompts to check"):  # fmt: skip
        assert done in log, done
    answers = json.loads((work / "answers.manifest.json").read_text())
    assert answers["config"]["num_samples"] == 2 and answers["config"]["seed"] == 3
    pairs = json.loads((work / "pairs.manifest.json").read_text())
    assert pairs["config"]["max_pairs"] == 1 and pairs["fingerprint"]["settings"]["max_pairs"] == 1
    table = pq.read_table(work / "dataset.parquet").to_pylist()
    assert len(table) == len(read_jsonl(work / "balanced.jsonl"))
    assert all(json.loads(r["origin_split"])["type"] == "qt" for r in table)
    assert (work / "report" / "report.json").is_file()
