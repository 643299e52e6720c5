"""Remote code is opt-in on every CLI that loads a checkpoint, and the LLaVA + MiniCPM-V data_gen script runs.

The script test runs script/data_gen/run_data_pipeline_llava15_minicpmv.sh end to end on CPU with a tiny LLaVA
policy, a tiny native MiniCPM-V labeler and the rule-based divide/changeq backends (eight fresh interpreters).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from utils.io import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "script" / "data_gen" / "run_data_pipeline_llava15_minicpmv.sh"
CLIS = ["muffin.feedback.generate", "muffin.feedback.autocheck", "muffin.feedback.pipeline", "eval.answer",
        "muffin.train.reference", "chat"]  # fmt: skip


@pytest.mark.parametrize("module", CLIS)
def test_cli_has_trust_remote_code_off_by_default(module: str) -> None:
    parser = importlib.import_module(module).make_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert "--trust-remote-code" in flags and parser.get_default("trust_remote_code") is False


def test_dpo_config_trust_remote_code_off_by_default() -> None:
    from muffin.train.args import DPOConfig

    assert DPOConfig(output_dir="/tmp/unused").trust_remote_code is False


def test_flag_is_ignored_by_families_without_remote_code(tiny_llava: Path, caplog: pytest.LogCaptureFixture) -> None:
    from muffin.family import load_family

    with caplog.at_level(logging.WARNING, logger="muffin.family"):
        fam = load_family(tiny_llava, device="cpu", trust_remote_code=True)
    assert type(fam).__name__ == "LlavaFamily" and "trust_remote_code ignored" in caplog.text


def _prompts(tmp: Path) -> Path:
    (tmp / "imgs").mkdir()
    rows = []
    for i, colour in enumerate(["red", "blue", "green"]):
        img = Image.new("RGB", (60, 45), "white")
        ImageDraw.Draw(img).ellipse([5 + 10 * i, 10, 25 + 10 * i, 30], fill=colour)
        img.save(tmp / "imgs" / f"s{i}.png")
        rows.append({"ds_question_id": f"s{i}", "image_path": f"imgs/s{i}.png", "question": "Describe the image."})
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python and torchrun
    return {**env, "PATH": path, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow  # eight fresh interpreters load torch: about 4 minutes on 2 CPU cores
def test_llava15_minicpmv_script_end_to_end(tiny_llava: Path, tmp_path: Path) -> None:
    """Every stage writes its output; the labeler is the native MiniCPM-V (no remote code, recorded as such); then
    autocheck with --trust-remote-code on a remote-code checkpoint runs that checkpoint's code."""
    from utils.tiny_models import build_tiny

    prompts = _prompts(tmp_path)
    labeler = build_tiny("minicpmv", tmp_path / "tiny-minicpmv")
    work = tmp_path / "work"
    env = _env(
        PROMPTS=str(prompts), IMAGE_ROOT=str(tmp_path), POLICY=str(tiny_llava), LABELER=str(labeler),
        SPLITTER="rule", CHANGEQ="rule", SPLIT_PROMPT="", CHANGEQ_PROMPT="", WORK=str(work), NUM_SAMPLES="2",
        MAX_NEW_TOKENS="12",
    )  # fmt: skip
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(read_jsonl(work / "answers.jsonl")) == 6
    checked = read_jsonl(work / "checked.jsonl")
    assert len(checked) == 6 and all(len(r["p_yes"]) == len(r["claims"]) for r in checked)
    assert {r["labeler"] for r in checked} == {"tiny-minicpmv"}
    manifest = json.loads((work / "checked.manifest.json").read_text())
    assert manifest["config"]["trust_remote_code"] is False
    assert pq.read_table(work / "dataset.parquet").num_rows == len(read_jsonl(work / "balanced.jsonl"))
    assert (work / "report").is_dir()

    remote = build_tiny("minicpmv_remote", tmp_path / "tiny-remote")
    cmd = [sys.executable, "-m", "muffin.feedback.autocheck", "--questions", str(work / "questions.jsonl"),
           "--prompts", str(prompts), "--image-root", str(tmp_path), "--labeler", str(remote)]  # fmt: skip
    refused = subprocess.run([*cmd, "--out", str(tmp_path / "r0.jsonl")], env=_env(), capture_output=True, text=True)
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr
    ok = subprocess.run(
        [*cmd, "--out", str(tmp_path / "r1.jsonl"), "--trust-remote-code"], env=_env(), capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "r1.jsonl")) == 6
    assert json.loads((tmp_path / "r1.manifest.json").read_text())["config"]["trust_remote_code"] is True
