"""DeepSpeed ZeRO-2 on the CPU: 2 ranks (torchrun, DeepSpeed's CPU accelerator) train like 1 process with batch 2.

Marked slow: starting DeepSpeed on the CPU (building its shared-memory comm op once) takes about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_data import write_rlaifv_parquet

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("deepspeed")


@pytest.mark.slow
def test_zero2_two_ranks_match_single_process(tmp_path: Path, tiny_llava: Path) -> None:
    from muffin.family import load_family

    data = write_rlaifv_parquet(tmp_path / "data", n=4)
    common = [
        "--model_path",
        str(tiny_llava),
        "--data",
        str(data),
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--use_cpu",
        "True",
        "--save_strategy",
        "no",
        "--seed",
        "0",
        "--disable_tqdm",
        "True",
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29561",
        "-m",
        "muffin.train.train_dpo",
        *common,
        "--output_dir",
        str(tmp_path / "ds"),
        "--per_device_train_batch_size",
        "1",
        "--deepspeed",
        str(REPO / "script" / "zero2.json"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "ds" / "model.safetensors").is_file()

    cmd1 = [
        sys.executable,
        "-m",
        "muffin.train.train_dpo",
        *common,
        "--output_dir",
        str(tmp_path / "single"),
        "--per_device_train_batch_size",
        "2",
    ]
    proc = subprocess.run(cmd1, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = load_family(tmp_path / "ds", device="cpu").model.state_dict()
    b = load_family(tmp_path / "single", device="cpu").model.state_dict()
    initial = load_family(tiny_llava, device="cpu").model.state_dict()
    assert any(not torch.equal(initial[k], a[k]) for k in a)  # the DeepSpeed run trained
    # Adam turns float noise in near-zero gradients into visible per-element differences: compare each tensor's
    # difference with the size of its update instead of element-wise
    for k in a:
        update = (b[k] - initial[k]).norm()
        assert (a[k] - b[k]).norm() <= 0.01 * update + 1e-7, k
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("ds", "single")]
    assert manifests[0]["metrics"]["train_loss"] == pytest.approx(manifests[1]["metrics"]["train_loss"], abs=1e-5)
