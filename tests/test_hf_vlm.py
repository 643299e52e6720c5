"""The generic transformers VLM family on tiny random Qwen2.5-VL, LLaVA-NeXT, Idefics3, SmolVLM and Gemma 3 models.

Expected texts are written out by hand from each published checkpoint's chat template (not rendered by the code
under test); expected log-probs are recomputed directly from the model on one unpadded sequence.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from muffin.decoding import CANDIDATE_SAMPLING, GREEDY
from muffin.family import Sample, detect_family, load_family
from muffin.hf_vlm.family import HFVisionLanguageFamily
from muffin.inference import answer_logps, generate, yes_no_probs, yes_no_token_ids
from utils.tiny_models import build_tiny

ARCHS = ["qwen2_5_vl", "llava_next", "idefics3", "smolvlm", "gemma3"]

# Hand-written from the published chat templates: prompt format ({img} per image, then the question), the image
# placeholder, the answer turn ({a}: answer, then the end-of-turn token the model emits to stop), and whether the
# tokenizer adds bos itself (LLaVA-NeXT's template writes no <s>; the others write theirs or have none).
FORMATS = {
    "qwen2_5_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{img}{q}<|im_end|>"
        "\n<|im_start|>assistant\n",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "{a}<|im_end|>",
        False,
    ),
    # the published template ends the turn with the text '<\s>' (a typo, not a token): the model stops on eos </s>
    "llava_next": ("[INST] {img}{q} [/INST]", "<image>\n", " {a}</s>", True),
    # "User:" directly before an image, "User: " before text
    "idefics3": (
        "<|begin_of_text|>User:{img}{q}<end_of_utterance>\nAssistant:",
        "<image>",
        " {a}<end_of_utterance>",
        False,
    ),
    "smolvlm": ("<|im_start|>User:{img}{q}<end_of_utterance>\nAssistant:", "<image>", " {a}<end_of_utterance>", False),
    "gemma3": (
        "<bos><start_of_turn>user\n{img}{q}<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_image>",
        "{a}<end_of_turn>",
        False,
    ),
}
# Read off each tiny tokenizer's style: byte-level BPE marks a leading space with "Ġ", Llama-style with "▁", and
# Qwen's / Gemma's answers start right after a newline, without a space. The tiny Qwen vocabulary has no "no".
YES_NO = {
    "qwen2_5_vl": (["Yes", "yes"], ["No", "n"]),
    "llava_next": (["▁Yes", "▁yes"], ["▁No", "▁no"]),
    "idefics3": (["ĠYes", "Ġyes"], ["ĠNo", "Ġno"]),
    "smolvlm": (["ĠYes", "Ġyes"], ["ĠNo", "Ġno"]),
    "gemma3": (["Yes", "yes"], ["No", "no"]),
}
LORA_PARTS = {  # (trainable projector prefixes, frozen vision prefixes), read off each model class
    "qwen2_5_vl": (["model.visual.merger"], ["model.visual.patch_embed", "model.visual.blocks"]),
    "llava_next": (["model.multi_modal_projector"], ["model.vision_tower"]),
    "idefics3": (["model.connector"], ["model.vision_model"]),
    "smolvlm": (["model.connector"], ["model.vision_model"]),
    "gemma3": (["model.multi_modal_projector"], ["model.vision_tower"]),
}


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


SAMPLES = [
    Sample(_image(70, 50, 0), "Is there a dog in the image?", "Yes, there is."),
    Sample(_image(40, 90, 1), "Describe the image in detail.", "The image shows a red circle on the left."),
    Sample(None, "How many objects?", "two"),
]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, HFVisionLanguageFamily]:
    arch = request.param
    if arch == "smolvlm" and importlib.util.find_spec("num2words") is None:
        pytest.skip("SmolVLMProcessor needs num2words (pip install num2words)")
    path = build_tiny(arch, tmp_path_factory.mktemp(arch))
    return arch, path, load_family(path, device="cpu", dtype=torch.float32)


def _hand_ids(arch: str, fam: HFVisionLanguageFamily, s: Sample, with_answer: bool) -> dict[str, torch.Tensor]:
    prompt, img, turn, add_bos = FORMATS[arch]
    text = prompt.format(img=img if s.image is not None else "", q=s.question)
    if arch in ("idefics3", "smolvlm") and s.image is None:
        text = text.replace("User:", "User: ", 1)
    if with_answer:
        text += turn.format(a=s.answer)
    images = [[s.image]] if s.image is not None else None
    return dict(fam.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=add_bos))


def test_detect_and_save_load_roundtrip(tiny, tmp_path: Path) -> None:
    arch, path, fam = tiny
    assert detect_family(path) == "hf_vlm"
    fam.save_pretrained(tmp_path / "copy")
    again = load_family(tmp_path / "copy", device="cpu", dtype=torch.float32)
    batch = fam.encode(SAMPLES)
    with torch.no_grad():
        torch.testing.assert_close(again.forward(batch), fam.forward(batch), rtol=0, atol=0)


def test_answer_mask_is_answer_plus_end_of_turn(tiny) -> None:
    """Decoded masked tokens == answer + end-of-turn; the tokens before them == the hand-written prompt."""
    arch, _, fam = tiny
    batch = fam.encode(SAMPLES)
    eot = FORMATS[arch][2].format(a="").strip()
    for i, s in enumerate(SAMPLES):
        real = batch["attention_mask"][i].bool()
        mask = batch["answer_mask"][i]
        assert not mask[~real].any()
        pos = mask.nonzero()[:, 0]
        assert (pos == torch.arange(int(pos[0]), int(real.sum()))).all(), "answer span must end the row"
        assert fam.tokenizer.decode(batch["input_ids"][i][mask]).strip() == s.answer + eot
        hand = _hand_ids(arch, fam, s, with_answer=True)["input_ids"][0]
        assert batch["input_ids"][i][real].tolist() == hand.tolist()
        prompt = _hand_ids(arch, fam, s, with_answer=False)["input_ids"][0]
        assert batch["input_ids"][i][: int(pos[0])].tolist() == prompt.tolist()


def test_generation_prompt_is_left_padded_hand_prompt(tiny) -> None:
    arch, _, fam = tiny
    batch = fam.encode(SAMPLES, for_generation=True)
    assert "answer_mask" not in batch
    for i, s in enumerate(SAMPLES):
        real = batch["attention_mask"][i].bool()
        assert real[-1], "generation batches are left padded"
        assert batch["input_ids"][i][real].tolist() == _hand_ids(arch, fam, s, False)["input_ids"][0].tolist()


def test_batched_generation_equals_one_at_a_time(tiny) -> None:
    """Greedy, and seeded sampling, give each sample the same answer whatever its batch (left padding + mask)."""
    _, _, fam = tiny
    greedy = GREEDY.replace(max_new_tokens=6)
    assert generate(fam, SAMPLES, greedy, batch_size=3) == [generate(fam, [s], greedy)[0] for s in SAMPLES]
    sampling = CANDIDATE_SAMPLING.replace(max_new_tokens=6)
    seeds = [11, 12, 13]
    batched = generate(fam, SAMPLES, sampling, seeds=seeds, batch_size=3)
    assert batched == [generate(fam, [s], sampling, seeds=[k])[0] for s, k in zip(SAMPLES, seeds)]


def test_answer_logps_equal_direct_recomputation(tiny) -> None:
    """sum log p(answer + eot) from a padded batch == a float64 log-softmax over one unpadded hand-built sequence."""
    arch, _, fam = tiny
    got = answer_logps(fam, SAMPLES, batch_size=3)
    for s, g in zip(SAMPLES, got):
        full = _hand_ids(arch, fam, s, with_answer=True)
        n_prompt = _hand_ids(arch, fam, s, with_answer=False)["input_ids"].shape[1]
        with torch.no_grad():
            logits = fam.model(**full).logits[0].double()  # (T, V)
        ids = full["input_ids"][0]
        logp = logits[:-1].log_softmax(-1).gather(-1, ids[1:, None])[:, 0]  # log p(x_t | x_<t), t >= 1
        expected = logp[n_prompt - 1 :]
        assert len(g.per_token) == len(ids) - n_prompt
        assert g.sum == pytest.approx(float(expected.sum()), abs=1e-4)
        assert g.mean == pytest.approx(float(expected.mean()), abs=1e-5)


def test_yes_no_probs_match_direct_softmax(tiny) -> None:
    arch, _, fam = tiny
    yes_tokens, no_tokens = YES_NO[arch]
    yes_ids = sorted(fam.tokenizer.convert_tokens_to_ids(yes_tokens))
    no_ids = sorted(fam.tokenizer.convert_tokens_to_ids(no_tokens))
    assert yes_no_token_ids(fam) == (yes_ids, no_ids)
    got = yes_no_probs(fam, SAMPLES, batch_size=3)
    for s, (p_yes, p_no) in zip(SAMPLES, got):
        with torch.no_grad():
            probs = fam.model(**_hand_ids(arch, fam, s, with_answer=False)).logits[0, -1].double().softmax(-1)
        assert p_yes == pytest.approx(float(probs[yes_ids].sum()), rel=1e-4)
        assert p_no == pytest.approx(float(probs[no_ids].sum()), rel=1e-4)


def test_lora_targets_trainable_and_frozen_partition_the_model(tiny) -> None:
    """2 LM layers x 7 linears (q, k, v, o, gate, up, down) = 14 LoRA targets; every parameter is in exactly one of
    LM, projector, vision tower, or (untied) lm_head."""
    arch, _, fam = tiny
    targets = fam.lora_target_modules()
    lm = fam.model.get_decoder()
    [lm_name] = [n for n, m in fam.model.named_modules() if m is lm]
    assert len(targets) == 14 and all(isinstance(fam.model.get_submodule(t), torch.nn.Linear) for t in targets)
    assert all(t.startswith(lm_name + ".") for t in targets)
    trainable, frozen = LORA_PARTS[arch]
    assert fam.trainable_modules() == trainable and fam.frozen_modules() == frozen
    groups = [lm_name, *trainable, *frozen, "lm_head", "model.image_newline"]  # LLaVA-NeXT's row separator
    for name, _ in fam.model.named_parameters():
        assert sum(name == g or name.startswith(g + ".") for g in groups) == 1, name

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(fam.model), LoraConfig(r=2, target_modules=targets))
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    assert n_lora == 14


def test_dynamic_resolution_and_several_images_per_sample(tmp_path: Path) -> None:
    """Qwen2.5-VL keeps each image's aspect ratio in multiples of 28 px (14 px patches, 2x2 merged): 56x112 px ->
    2x4 = 8 tokens, 112x112 px -> 4x4 = 16 tokens; two images in one sample get 8 + 16 = 24 placeholders."""
    fam = load_family(build_tiny("qwen2_5_vl", tmp_path / "q"), device="cpu", dtype=torch.float32)
    image_id = fam.model.config.image_token_id
    one = fam.encode([Sample(_image(56, 112, 2), "What is this?", "A cat.")])
    assert int((one["input_ids"] == image_id).sum()) == 8
    pair = Sample([_image(56, 112, 2), _image(112, 112, 3)], "Compare them.", "Same.")  # type: ignore[arg-type]
    two = fam.encode([pair])
    assert int((two["input_ids"] == image_id).sum()) == 24
    assert fam.tokenizer.decode(two["input_ids"][0][two["answer_mask"][0]]) == "Same.<|im_end|>"
    assert generate(fam, [pair], GREEDY.replace(max_new_tokens=3)) == generate(
        fam, [pair], GREEDY.replace(max_new_tokens=3)
    )


def test_errors_name_the_sample_and_the_fix(tiny) -> None:
    _, _, fam = tiny
    with pytest.raises(ValueError, match="sample 1 has no answer"):
        fam.encode([SAMPLES[0], Sample(None, "q?")])
    with pytest.raises(TypeError, match="sample 0, field 'image'.*not a PIL image"):
        fam.encode([Sample("a/path.jpg", "q?", "a")])  # type: ignore[arg-type]
    config = fam.model.config.get_text_config()
    old = config.max_position_embeddings
    config.max_position_embeddings = 8
    try:
        with pytest.raises(ValueError, match="sample 0: .* exceed the model's context of 8"):
            fam.encode([SAMPLES[0]])
    finally:
        config.max_position_embeddings = old


PACKS = {"qwen2_5_vl": False, "gemma3": False, "llava_next": True, "idefics3": True, "smolvlm": True}


def test_shared_prefix_fast_path_equals_plain_path(tiny) -> None:
    """Where the family packs (1D RoPE, causal attention), packed log-probs, gradients and yes/no logits equal the
    plain path's; M-RoPE (Qwen2.5-VL) and bidirectional image attention (Gemma 3) fall back to the plain path."""
    from muffin.fast.packing import packed_answer_logps, packed_next_token_logits, plain_answer_logps, supports_packing

    arch, _, fam = tiny
    assert supports_packing(fam) == PACKS[arch]
    if not PACKS[arch]:
        return
    pairs = [[s, Sample(s.image, s.question, s.answer + " And a dog on the road.")] for s in SAMPLES]
    results = []
    for packed in (False, True):
        fam.model.zero_grad()
        out = packed_answer_logps(fam, pairs, chunk=7) if packed else plain_answer_logps(fam, sum(pairs, []))
        (out.sums * torch.linspace(0.5, 1.5, len(out.sums))).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in fam.model.named_parameters() if p.grad is not None}))
    fam.model.zero_grad()
    (plain, g_plain), (fast, g_fast) = results
    torch.testing.assert_close(fast.sums, plain.sums, atol=1e-4, rtol=1e-5)
    assert g_fast.keys() == g_plain.keys() and any(n.startswith(fam.trainable_modules()[0]) for n in g_plain)
    for n in g_plain:
        torch.testing.assert_close(g_fast[n], g_plain[n], atol=1e-4, rtol=1e-3, msg=n)
    groups = [
        [Sample(SAMPLES[0].image, "Is there a dog?"), Sample(SAMPLES[0].image, "Is there a red circle?")],
        [Sample(SAMPLES[1].image, "Is there a cup?")],
    ]
    with torch.no_grad():
        got = packed_next_token_logits(fam, groups)
        want = torch.stack([fam.forward(fam.encode([s], for_generation=True))[0, -1] for g in groups for s in g])
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_bf16_on_cuda_matches_float32_on_cpu(tiny) -> None:
    """bf16 on CUDA: answer log-prob sums within bf16 noise of float32 on the CPU (0.5% of |sum|, at least 0.05),
    yes/no probabilities within 0.01, and generation runs on the GPU batch."""
    arch, path, fam = tiny
    gpu = load_family(path, device="cuda", dtype=torch.bfloat16)
    want = [x.sum for x in answer_logps(fam, SAMPLES, batch_size=3)]
    got = [x.sum for x in answer_logps(gpu, SAMPLES, batch_size=3)]
    for g, w in zip(got, want):
        assert abs(g - w) <= max(0.05, 0.005 * abs(w)), (arch, got, want)
    for (gy, gn), (wy, wn) in zip(yes_no_probs(gpu, SAMPLES), yes_no_probs(fam, SAMPLES)):
        assert abs(gy - wy) < 0.01 and abs(gn - wn) < 0.01
    assert len(generate(gpu, SAMPLES, GREEDY.replace(max_new_tokens=4), batch_size=3)) == len(SAMPLES)
