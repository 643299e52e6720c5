"""Training runs that survive: atomic checkpoints, resume past a torn one, kill -9 at random points; no secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_data import write_rlaifv_parquet
from test_train_trainer import config

from muffin.train.train_dpo import train

HUB_TOKEN = "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"


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return write_rlaifv_parquet(tmp_path / "data", n=4)


def test_hub_token_reaches_no_manifest_checkpoint_or_log(
    tmp_path: Path, tiny_llava: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--hub_token used to be written in plain text into manifest.json (asdict(args)); it must appear in no file
    of the output folder (manifest, trainer_state, training_args.bin pickles) and in no log line."""
    caplog.set_level("INFO")
    args = config(
        tmp_path, tiny_llava, data_dir, max_steps=1, save_strategy="steps", save_steps=1, hub_token=HUB_TOKEN
    )
    train(args)
    assert args.hub_token == HUB_TOKEN  # the running process keeps it (push_to_hub needs it)
    out = Path(args.output_dir)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and (out / "manifest.json").is_file()
    for p in files:
        assert HUB_TOKEN.encode() not in p.read_bytes(), p
    assert json.loads((out / "manifest.json").read_text())["config"]["hub_token"] == "<redacted>"
    assert HUB_TOKEN not in caplog.text
