"""The MiniCPM-V family on a tiny native checkpoint in the published format: loading, prompts, yes/no, sampling.

The fixture is ``utils.tiny_models minicpmv`` (sizes shrunk, every published key name); with the reference folder a
second one is made from the published config.json / preprocessor_config.json / tokenizer_config.json themselves.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from muffin.decoding import CANDIDATE_SAMPLING, GREEDY
from muffin.family import Sample, detect_family, load_family
from muffin.inference import generate, yes_no_probs, yes_no_token_ids
from omnilmm.minicpmv_model import MiniCPMV
from omnilmm.minicpmv_tiny import build_tiny_minicpmv

PUB = "checkpoints/openbmb--MiniCPM-Llama3-V-2_5"
SIZE_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"}
SIZE_KEYS |= {"query_num", "image_size", "vocab_size", "bos_token_id", "eos_token_id", "vision_config"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from utils.tiny_models import build_tiny

    return build_tiny("minicpmv", tmp_path_factory.mktemp("tiny-minicpmv"))


@pytest.fixture(scope="module")
def fam(tiny: Path):
    return load_family(tiny, device="cpu", dtype=torch.float32)


QUESTIONS = [
    Sample(Image.new("RGB", (40, 30), (200, 10, 10)), "Is there a dog in the image?"),
    Sample(None, "Is it red? Answer yes or no."),
    Sample(Image.new("RGB", (20, 50), (10, 200, 10)), "Is there a red circle?"),
]


def flat(pairs: list[tuple[float, float]]) -> list[float]:
    return [p for pair in pairs for p in pair]


def test_tiny_from_published_files_changes_only_sizes(reference_dir: Path, tmp_path: Path) -> None:
    """Made from the published files: config differs only in sizes (and the token ids that move with the vocab),
    the weights carry exactly the published key names, the added tokens keep their published order, and the family
    loads it with no remote code."""
    pub = reference_dir / PUB
    path = build_tiny_minicpmv(tmp_path / "t", published=pub)
    ours, theirs = (json.loads((p / "config.json").read_text()) for p in (path, pub))
    assert set(ours) == set(theirs)
    assert {k for k in theirs if ours[k] != theirs[k]} <= SIZE_KEYS
    assert set(ours["vision_config"]) == set(theirs["vision_config"])
    assert ours["vision_config"]["model_type"] == "idefics2" and ours["vision_config"]["patch_size"] == 14
    index = json.loads((pub / "model.safetensors.index.json").read_text())["weight_map"]
    keys = set(load_file(str(path / "model.safetensors")))
    layers = {re.sub(r"\.\d+\.", ".N.", k) for k in keys}
    assert keys <= set(index) and layers == {re.sub(r"\.\d+\.", ".N.", k) for k in index}  # fewer layers only
    # resampler 13, tower outside its layers 5, LM outside its layers 3, 9 per LM layer, 16 per tower layer:
    # 13 + 5 + 3 + 32 * 9 + 27 * 16 = 741 published; 2 layers each in the tiny
    assert len(index) == 13 + 5 + 3 + 32 * 9 + 27 * 16 and len(keys) == 13 + 5 + 3 + 2 * 9 + 2 * 16
    pre_ours, pre_theirs = (json.loads((p / "preprocessor_config.json").read_text()) for p in (path, pub))
    assert {k for k in pre_theirs if pre_ours[k] != pre_theirs[k]} == {"scale_resolution", "image_feature_size"}
    added = json.loads((pub / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    f = load_family(path, device="cpu")
    ids = f.tokenizer.convert_tokens_to_ids([added[k]["content"] for k in sorted(added, key=int)])
    assert ids == list(range(ids[0], ids[0] + 256)) and ids[-1] == ours["vocab_size"] - 1
    assert isinstance(f.model, MiniCPMV) and f.tokenizer.pad_token == "!"


def test_loads_natively(fam, tiny: Path) -> None:
    assert detect_family(tiny) == "minicpmv"
    assert isinstance(fam.model, MiniCPMV)  # ours, not a transformers_modules class
    assert fam.eot_id == fam.tokenizer.convert_tokens_to_ids("<|eot_id|>")


@pytest.mark.parametrize("damage", ["drop", "extra", "shape"])
def test_weights_must_match_key_for_key(tiny: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    sd = load_file(str(bad / "model.safetensors"))
    if damage == "drop":
        del sd["resampler.ln_q.bias"]
    elif damage == "extra":
        sd["llm.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    else:
        sd["resampler.query"] = torch.zeros(3, sd["resampler.query"].shape[1])
    save_file(sd, str(bad / "model.safetensors"))
    match = {"drop": "missing.*resampler.ln_q.bias", "extra": "unexpected.*rotary_emb", "shape": "resampler.query"}
    with pytest.raises((KeyError, ValueError), match=match[damage]):
        load_family(bad, device="cpu")


def test_prompt_holds_one_placeholder_per_slice(fam) -> None:
    """40x30 at scale 28 (by hand): 1200/784 -> 2 slices wanted, grid 2x1 (|log(4/3) - log 2| = .41 is least);
    source 28x28 and two 28x28 cells -> 3 slices of 2x2 patches; prompt = <image> 8 x <unk> </image> <slice>
    (<image> 8 x <unk> </image>) x 2 </slice>, and each image_bound spans one slice's 8 <unk>."""
    batch = fam.encode(QUESTIONS[:1], for_generation=True)
    assert batch["tgt_sizes"][0].tolist() == [[2, 2]] * 3
    text = fam.tokenizer.decode(batch["input_ids"][0])
    one = "<image>" + "<unk>" * 8 + "</image>"
    assert one + "<slice>" + one * 2 + "</slice>\nIs there a dog in the image?<|eot_id|>" in text
    unk = fam.tokenizer.convert_tokens_to_ids("<unk>")
    for s, e in batch["image_bound"][0].tolist():
        assert e - s == 8 and bool((batch["input_ids"][0, s:e] == unk).all())


def test_several_images_in_one_sample(fam) -> None:
    """Two images: two tags joined by newlines before the question (the original chat()'s layout), each image's
    slices in order; the 40x30 image has 3 slices (above), the 20x20 one fits in one (400 < 784 px)."""
    two = Sample([QUESTIONS[0].image, Image.new("RGB", (20, 20))], "Same colour?")
    batch = fam.encode([two], for_generation=True)
    assert len(batch["pixel_values"][0]) == 4 and len(batch["image_bound"][0]) == 4
    one = "<image>" + "<unk>" * 8 + "</image>"
    text = fam.tokenizer.decode(batch["input_ids"][0])
    assert one + "<slice>" + one * 2 + "</slice>\n" + one + "\nSame colour?<|eot_id|>" in text
    assert len(yes_no_probs(fam, [two, QUESTIONS[0]])) == 2


def test_yes_no_batched_equals_alone_and_reads_the_image(fam) -> None:
    """Left-padded batch of three = each alone; another image changes the probabilities (the tower is wired in)."""
    batched = yes_no_probs(fam, QUESTIONS, batch_size=3, packed=False)
    alone = [yes_no_probs(fam, [q], packed=False)[0] for q in QUESTIONS]
    assert flat(batched) == pytest.approx(flat(alone), rel=1e-4)
    other = yes_no_probs(fam, [Sample(Image.new("RGB", (40, 30), (0, 0, 250)), QUESTIONS[0].question)])
    assert flat(other) != pytest.approx(flat(alone[:1]), rel=1e-4)
    yes, no = yes_no_token_ids(fam)
    assert yes and no and not set(yes) & set(no)


def test_answer_mask_is_answer_plus_eot(fam) -> None:
    batch = fam.encode([Sample(QUESTIONS[0].image, "What is it?", "A red box.")])
    assert fam.tokenizer.decode(batch["input_ids"][0][batch["answer_mask"][0]]) == "A red box.<|eot_id|>"


def test_greedy_is_batch_independent(fam) -> None:
    dec = GREEDY.replace(max_new_tokens=4)
    assert generate(fam, QUESTIONS, dec, batch_size=3) == [generate(fam, [q], dec)[0] for q in QUESTIONS]


def test_candidate_sampling_ten_per_prompt(fam) -> None:
    """The paper's sampler preset; 10 seeded samples differ and each is repeatable alone with its seed."""
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=4)
    batched = generate(fam, [QUESTIONS[0]] * 10, dec, seeds=list(range(100, 110)), batch_size=10)
    assert len(set(batched)) > 1
    assert batched[3] == generate(fam, [QUESTIONS[0]], dec, seeds=[103])[0]


def test_bf16_scores_and_samples(tiny: Path) -> None:
    """bf16 (the default dtype on a GPU): the tower runs in the LM's dtype and the read-out stays close to fp32."""
    f16 = load_family(tiny, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in f16.model.parameters()} == {torch.bfloat16}
    ref = load_family(tiny, device="cpu", dtype=torch.float32)
    assert flat(yes_no_probs(f16, QUESTIONS)) == pytest.approx(flat(yes_no_probs(ref, QUESTIONS)), rel=0.1)
    assert len(generate(f16, QUESTIONS, GREEDY.replace(max_new_tokens=3), batch_size=3)) == 3


def test_save_pretrained_round_trip(fam, tmp_path: Path) -> None:
    fam.save_pretrained(tmp_path / "saved")
    again = load_family(tmp_path / "saved", device="cpu")
    assert flat(yes_no_probs(again, QUESTIONS)) == pytest.approx(flat(yes_no_probs(fam, QUESTIONS)), rel=1e-6)


def _dpo_args(tiny: Path, tmp_path: Path, **kw):
    from test_train_data import write_rlaifv_parquet

    from muffin.train.args import DPOConfig

    return DPOConfig(
        output_dir=str(tmp_path / "out"),
        model_path=str(tiny),
        data=str(write_rlaifv_parquet(tmp_path / "pairs", n=2)),
        logps_dir=str(tmp_path / "logps"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        seed=0,
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )


def test_chat_and_two_dpo_steps(tiny: Path, tmp_path: Path) -> None:
    """RLAIFVChat answers; two DPO steps run through train_dpo's build_trainer: the first loss is log 2 (policy ==
    reference) and every trainable parameter moves."""
    from chat import RLAIFVChat
    from muffin.train.train_dpo import build_trainer

    bot = RLAIFVChat(tiny, device="cpu", decoding=GREEDY.replace(max_new_tokens=4))
    assert isinstance(bot.chat({"image": QUESTIONS[0].image, "question": "What is in the image?"}), str)
    trainer = build_trainer(_dpo_args(tiny, tmp_path, save_strategy="no"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 2 and before
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n].detach()) for n in before)


def test_lora_checkpoint_merges_at_load(tiny: Path, tmp_path: Path) -> None:
    """Two LoRA DPO steps saved as a checkpoint; load_family(base, lora_path=ckpt) gives the trained weights (the
    adapter merged in memory, plus the fully trained resampler), not the base ones."""
    from muffin.train.train_dpo import build_trainer

    trainer = build_trainer(_dpo_args(tiny, tmp_path, use_lora=True, save_strategy="steps", save_steps=2))
    trainer.train()
    trained = {k: v.detach() for k, v in trainer.model.merge_and_unload().state_dict().items()}
    merged = load_family(tiny, device="cpu", lora_path=tmp_path / "out" / "checkpoint-2").model.state_dict()
    base = load_family(tiny, device="cpu").model.state_dict()
    assert set(merged) == set(trained) == set(base)
    assert all(torch.allclose(merged[k], trained[k], atol=1e-6) for k in trained)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert any(k.startswith("resampler.") for k in changed) and any(".q_proj." in k for k in changed)
