"""Plain DDP on the CPU: 2 ranks (torchrun, gloo) train like 1 process with batch 2.

Under DDP the trainer runs the plain path through the DDP wrapper (``family.forward(batch, model=wrapper)``, whose
hooks average the gradients over ranks); the single process packs. Both must give the same weights and loss.
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


@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(tmp_path: Path, tiny_llava: Path) -> None:
    from muffin.family import load_family

    data = write_rlaifv_parquet(tmp_path / "data", n=4)
    common = [
        *("--model_path", str(tiny_llava), "--data", str(data), "--max_steps", "2", "--learning_rate", "1e-3"),
        *("--report_to", "none", "--use_cpu", "True", "--save_strategy", "no", "--seed", "0"),
        *("--disable_tqdm", "True", "--logging_steps", "1"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    runs = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571"]
        + ["-m", "muffin.train.train_dpo", "--per_device_train_batch_size", "1"],
        "single": [sys.executable, "-m", "muffin.train.train_dpo", "--per_device_train_batch_size", "2"],
    }
    for name, cmd in runs.items():
        out = tmp_path / name
        proc = subprocess.run(
            [*cmd, *common, "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
    a = load_family(tmp_path / "ddp", device="cpu").model.state_dict()
    b = load_family(tmp_path / "single", device="cpu").model.state_dict()
    initial = load_family(tiny_llava, device="cpu").model.state_dict()
    assert any(not torch.equal(initial[k], a[k]) for k in a)  # the DDP run trained
    # Adam turns float noise in near-zero gradients into visible per-element differences: compare each tensor's
    # difference with the size of its update instead of element-wise
    for k in a:
        update = (b[k] - initial[k]).norm()
        assert (a[k] - b[k]).norm() <= 0.01 * update + 1e-7, k
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("ddp", "single")]
    assert manifests[0]["metrics"]["train_loss"] == pytest.approx(manifests[1]["metrics"]["train_loss"], abs=1e-5)
