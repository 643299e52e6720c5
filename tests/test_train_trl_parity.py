"""Parity with TRL's DPOTrainer (trl 1.x): same tiny LLaVA, same pairs -> same per-sequence log-probs and loss.

Our side: cached reference log-probs (computed by ``muffin.train.reference`` from the initial model) and the
policy through ``concatenated_logps``. TRL's side: its own loss and log-prob code (``DPOTrainer._compute_loss``,
fused LM head) with the reference computed online by a separate copy of the initial model. The policy is the
initial model with perturbed projector and LM weights, so policy and reference differ. Both sides get the same
token ids (our template's encoding, chosen rows then rejected rows, the answer mask as TRL's completion mask).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_data import write_rlaifv_parquet

trl = pytest.importorskip("trl")


def test_logps_and_loss_match_trl(tmp_path: Path, tiny_llava: Path) -> None:
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    from muffin.family import load_family
    from muffin.train.args import DPOConfig
    from muffin.train.loss import sequence_logps
    from muffin.train.policy import concatenated_logps
    from muffin.train.train_dpo import build_trainer

    data = write_rlaifv_parquet(tmp_path / "data", n=3)
    ours = build_trainer(
        DPOConfig(
            output_dir=str(tmp_path / "out"),
            model_path=str(tiny_llava),
            data=str(data),
            use_cpu=True,
            report_to="none",
            beta=0.1,
        )
    )
    fam = ours.family
    torch.manual_seed(0)
    with torch.no_grad():  # the policy moves away from the reference
        for p in list(fam.model.model.multi_modal_projector.parameters()) + [fam.model.lm_head.weight]:
            p.add_(0.05 * torch.randn_like(p))
    fam.model.eval()

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(tiny_llava),
        tokenizer=AutoTokenizer.from_pretrained(tiny_llava),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    dummy = Dataset.from_dict(
        {"prompt": ["q"], "chosen": [" a"], "rejected": [" b"], "image": [Image.new("RGB", (32, 32))]}
    )  # TRL requires one; never iterated here
    theirs = trl.DPOTrainer(
        model=fam.model,
        ref_model=load_family(tiny_llava, device="cpu").model,
        args=trl.DPOConfig(
            output_dir=str(tmp_path / "trl"),
            report_to="none",
            use_cpu=True,
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=False,
            bf16=False,
        ),  # TRL defaults to bf16 autocast; both fp32
        processing_class=processor,
        train_dataset=dummy,
    )
    theirs.model.eval()

    def trl_step(batch: dict) -> tuple[float, dict[str, float]]:
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": batch["answer_mask"].long(),
            "pixel_values": batch["pixel_values"],
        }
        theirs._metrics["eval"].clear()
        with torch.no_grad():
            loss = theirs._compute_loss(theirs.model, inputs, False).item()
        return loss, {k: v[-1] for k, v in theirs._metrics["eval"].items()}

    ds = ours.train_dataset
    for i in range(len(ds)):  # one pair per batch: TRL's logged means are then per-sequence values
        batch = ours.data_collator([ds[i]])
        with torch.no_grad():
            per_token, mask = concatenated_logps(fam, batch)
            our_loss = ours.compute_loss(fam.model, batch).item()
        policy = sequence_logps(per_token, mask)
        ref = sequence_logps(batch["ref_per_token"], mask)
        trl_loss, m = trl_step(batch)
        assert policy[0].item() == pytest.approx(m["logps/chosen"], abs=1e-4)
        assert policy[1].item() == pytest.approx(m["logps/rejected"], abs=1e-4)
        trl_ref_c = m["logps/chosen"] - m["rewards/chosen"] / 0.1
        trl_ref_r = m["logps/rejected"] - m["rewards/rejected"] / 0.1
        assert ref[0].item() == pytest.approx(trl_ref_c, abs=1e-4)
        assert ref[1].item() == pytest.approx(trl_ref_r, abs=1e-4)
        assert our_loss == pytest.approx(trl_loss, abs=1e-4)
        assert abs(m["rewards/margins"]) > 1e-3  # the comparison is not the trivial policy == reference case
    batch = ours.data_collator([ds[0], ds[1], ds[2]])  # several pairs, padded: the mean loss agrees too
    with torch.no_grad():
        our_loss = ours.compute_loss(fam.model, batch).item()
    assert our_loss == pytest.approx(trl_step(batch)[0], abs=1e-4)
