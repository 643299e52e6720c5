"""Two DPO steps, full and LoRA, through ``muffin.train`` on tiny Qwen2.5-VL, LLaVA-NeXT, Idefics3, SmolVLM, Gemma 3.

The trainer is family-agnostic; these tests check that the generic family's encode/forward, LoRA targets,
projector and vision-tower prefixes, save and LoRA merge plug into it unchanged.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from test_train_data import write_rlaifv_parquet

from muffin.family import Sample, load_family
from muffin.inference import answer_logps
from muffin.train.args import DPOConfig
from muffin.train.data import PreferenceDataset
from muffin.train.train_dpo import build_trainer
from utils.tiny_models import build_tiny

ARCHS = ["qwen2_5_vl", "llava_next", "idefics3", "smolvlm", "gemma3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rlaifv_parquet(tmp_path_factory.mktemp("pairs"), n=2)


@pytest.fixture(scope="module", params=ARCHS)
def tiny_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "smolvlm" and importlib.util.find_spec("num2words") is None:
        pytest.skip("SmolVLMProcessor needs num2words (pip install num2words)")
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


def _config(tmp: Path, model: Path, data: Path, **kw: object) -> DPOConfig:
    base = dict(
        output_dir=str(tmp / "out"),
        model_path=str(model),
        data=str(data),
        logps_dir=str(tmp / "logps"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return DPOConfig(**base)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_two_full_dpo_steps_change_every_trainable_weight(tmp_path: Path, tiny_path: Path, data_dir: Path) -> None:
    """Step 1 has policy == reference, so its loss is -log sigmoid(0) = log 2; the vision tower stays frozen."""
    trainer = build_trainer(_config(tmp_path, tiny_path, data_dir))
    frozen = tuple(p + "." for p in trainer.family.frozen_modules())
    before = _snapshot(trainer.model)
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(frozen) for n in trainable)
    for n, p in trainer.model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_two_lora_dpo_steps_train_adapters_and_projector_and_merge(
    tmp_path: Path, tiny_path: Path, data_dir: Path
) -> None:
    trainer = build_trainer(
        _config(tmp_path, tiny_path, data_dir, use_lora=True, lora_dropout=0.0, lora_r=4, lora_alpha=8)
    )
    family = trainer.family
    projector = tuple(p + "." for p in family.trainable_modules())
    model = family.model
    before = _snapshot(model)
    trainer.train()
    n_lora = 0
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        lora_b = "lora_B" in n  # B starts at zero; after two steps both A and B moved
        if "lora_" in n or n.startswith(projector):
            assert changed, f"{n} did not change"
            n_lora += lora_b
        else:
            assert not changed, f"base weight {n} changed"
    assert n_lora == len(family.lora_target_modules())
    ckpt = tmp_path / "ckpt"
    trainer.save_model(str(ckpt))
    merged = load_family(tiny_path, device="cpu", lora_path=ckpt)
    ds = PreferenceDataset(data_dir)
    samples = [Sample(ds[i]["image"], ds[i]["question"], ds[i]["chosen"]) for i in range(2)]
    model.eval()
    ours = [x.sum for x in answer_logps(family, samples)]
    assert ours == pytest.approx([x.sum for x in answer_logps(merged, samples)], abs=1e-4)
    assert ours != pytest.approx(
        [x.sum for x in answer_logps(load_family(tiny_path, device="cpu"), samples)], abs=1e-4
    )
