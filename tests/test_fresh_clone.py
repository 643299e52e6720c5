"""A clone works on its own: the README's first commands run in a fresh clone with nothing beside it, and nothing a
user runs names the development folder ``../shared`` (only tests read it, through ``RLAIFV_REFERENCE``)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tracked_files() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_nothing_outside_tests_names_the_shared_folder() -> None:
    """Code, scripts and docs never point at ``../shared`` (a clone has no such folder); the CHANGELOG's history may."""
    offenders = []
    for name in _tracked_files():
        if name.startswith("tests/") or name == "CHANGELOG.md" or name.endswith((".png", ".safetensors")):
            continue
        text = (REPO / name).read_text(errors="replace")
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(r"\.\./shared|shared/reference", line):
                offenders.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def readme_first_commands() -> list[str]:
    """The commands of the README's "First things to try" block, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    section = text.split("## First things to try", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for raw in block.strip().splitlines():
        line = raw.split("  #", 1)[0].rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((pending + line).strip())
        pending = ""
    return [c for c in commands if c]


def test_readme_first_commands_are_the_ones_tested() -> None:
    """The clone test below runs these; if the README changes, this test says which command is new."""
    commands = readme_first_commands()
    assert commands[0] == "python chat.py"
    assert commands[1].startswith("bash script/data_gen/run_data_pipeline_cpu_tiny.sh /tmp/dry")
    assert commands[2].startswith("bash script/train/llava15_train_lora.sh --model_path /tmp/dry/tiny-llava")
    assert commands[3].startswith("bash script/demo/world_cpu.sh")
    assert len(commands) == 4


def _clone(tmp_path: Path) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    dest = tmp_path / "clone" / "rlaifv"  # no ../shared next to it
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(dest)], check=True)
    assert not (dest.parent / "shared").exists()
    return dest


def _run(cmd: str, cwd: Path, work: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run a README command in the clone, its /tmp/dry paths moved into the test's folder."""
    cmd = cmd.replace("/tmp/dry", str(work))
    env = {k: v for k, v in os.environ.items() if k not in ("RLAIFV_REFERENCE", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(cwd), THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this interpreter
    return subprocess.run(
        shlex.split(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_readme_quick_start_in_a_fresh_clone(tmp_path: Path) -> None:
    """The first three commands of the README, in a clone of HEAD in an empty folder: the chat demo answers about
    its scene, the pipeline dry run writes a dataset, and the training dry run on that dataset saves checkpoints.
    (The committed tree is what is cloned: uncommitted changes are not tested here.)"""
    clone = _clone(tmp_path)
    work = tmp_path / "dry"
    chat, pipeline, train, _ = readme_first_commands()

    res = _run(chat, clone, work, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "synthetic scene 0" in res.stderr and res.stdout.strip()

    res = _run(pipeline, clone, work, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (work / "data" / "dataset.parquet").is_file()

    res = _run(train + " --save_steps 1", clone, work, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (work / "dpo" / "checkpoint-2").is_dir() and (work / "dpo" / "adapter_model.safetensors").is_file()


def test_training_script_failure_ends_with_the_real_error(tmp_path: Path, tiny_llava: Path) -> None:
    """A bad --data ends with one line naming the step and the child's own error, and the log path."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    res = subprocess.run(
        ["bash", "script/train/llava15_train_lora.sh", "--model_path", str(tiny_llava), "--data",
         str(tmp_path / "missing.parquet"), "--output_dir", str(tmp_path / "out"), "--cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    tail = res.stderr.strip().splitlines()[-2:]
    assert tail[0].startswith("error: the reference step failed"), tail
    assert "missing.parquet" in tail[0] and tail[1].strip() == f"full output: {tmp_path / 'out' / 'launch.log'}"


def test_training_script_passes_compile_layers_to_the_reference_step(tmp_path: Path, tiny_llava: Path) -> None:
    """--compile_layers is shared by the reference step and training: a bad value stops the reference step (the
    first) with argparse's own error naming the flag and its choices."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    res = subprocess.run(
        ["bash", "script/train/llava15_train_lora.sh", "--model_path", str(tiny_llava), "--data",
         str(tmp_path / "d.parquet"), "--output_dir", str(tmp_path / "out"), "--cpu", "--compile_layers", "maybe"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    assert "error: the reference step failed" in res.stderr, res.stderr[-2000:]
    assert "--compile_layers" in res.stderr and "invalid choice: 'maybe'" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--model_path", "--launcher"])
def test_training_script_flag_errors(tmp_path: Path, flag: str) -> None:
    """A flag without its value, or an unknown launcher, stops before anything starts, with one line."""
    args = ["--model_path", "m", "--data", "d", "--output_dir", str(tmp_path)]
    args = args + [flag] if flag == "--model_path" else args + ["--launcher", "mpirun"]
    res = subprocess.run(
        ["bash", "script/train/llava15_train.sh", *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


def test_commands_print_no_import_time_warnings(tmp_path: Path) -> None:
    """`python -m eval.objhal` runs its module once (no "found in sys.modules" warning), and on a machine without a
    GPU DeepSpeed does not announce "Setting accelerator to CPU" on every command that loads a model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DS_ACCELERATOR", None)
    res = subprocess.run([sys.executable, "-m", "eval.objhal", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    assert "RuntimeWarning" not in res.stderr and "found in sys.modules" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "utils.tiny_models", "llava", str(tmp_path / "m")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    if not Path("/dev/nvidia0").exists():
        assert "Setting accelerator to CPU" not in res.stderr
