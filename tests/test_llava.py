"""LLaVA 1.5 family: template, pad preprocessing, checkpoint formats, batching, log-probs, yes/no, LoRA."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from llava import convert
from llava.preprocess import expand_to_square, make_image_processor, preprocess
from llava.template import render
from muffin import Sample, load_family
from muffin.decoding import CANDIDATE_SAMPLING, GREEDY
from muffin.inference import answer_logps, generate, prefetched, yes_no_probs, yes_no_token_ids

SYSTEM_TEXT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)


def test_template_byte_exact() -> None:
    assert render("What is it?") == SYSTEM_TEXT + " USER: <image>\nWhat is it? ASSISTANT:"
    assert render("What is it?", "A cat.") == SYSTEM_TEXT + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
    assert render("Hi", has_image=False) == SYSTEM_TEXT + " USER: Hi ASSISTANT:"


def test_pad_preprocessing_by_hand() -> None:
    """A 4x2 red image is centred on a 4x4 canvas of (122, 116, 104): rows 0 and 3 grey, rows 1-2 red.

    At size 4 the CLIP resize and crop are identities, so pixel = (v / 255 - mean) / std with the CLIP constants.
    """
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    sq = np.asarray(expand_to_square(img))
    assert sq.shape == (4, 4, 3)
    assert (sq[0] == [122, 116, 104]).all() and (sq[3] == [122, 116, 104]).all()
    assert (sq[1] == [255, 0, 0]).all() and (sq[2] == [255, 0, 0]).all()
    px = preprocess([img], make_image_processor(4))[0]  # (3, 4, 4)
    grey_r = (122 / 255 - 0.48145466) / 0.26862954
    red_r = (255 / 255 - 0.48145466) / 0.26862954
    red_g = (0 / 255 - 0.4578275) / 0.26130258
    grey_b = (104 / 255 - 0.40821073) / 0.27577711
    assert px[0, 0, 0].item() == pytest.approx(grey_r, abs=1e-4)
    assert px[0, 1, 2].item() == pytest.approx(red_r, abs=1e-4)
    assert px[1, 2, 3].item() == pytest.approx(red_g, abs=1e-4)
    assert px[2, 3, 1].item() == pytest.approx(grey_b, abs=1e-4)
    # a tall image is padded left/right instead
    tall = np.asarray(expand_to_square(Image.new("RGB", (2, 4), (0, 0, 255))))
    assert (tall[:, 0] == [122, 116, 104]).all() and (tall[:, 1] == [0, 0, 255]).all()


@pytest.fixture(scope="module")
def fam(tiny_llava):
    return load_family(tiny_llava, device="cpu")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(30, 40), (32, 32), (50, 20)]
    ]


def test_original_and_hf_formats_give_same_logits(tiny_llava_original, images) -> None:
    """Original layout -> converted on load; same weights saved in hf layout -> same logits on the base vocab."""
    orig = load_family(tiny_llava_original, device="cpu")
    keys = set(convert.load_state_dict_files(tiny_llava_original))
    assert {
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
    } <= keys
    assert not any("language_model" in k or "multi_modal_projector" in k for k in keys)
    cfg = json.loads((tiny_llava_original / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "mlp2x_gelu"
    base_vocab = cfg["vocab_size"]
    hf_dir = tiny_llava_original.parent / "converted-hf"
    orig.save_pretrained(hf_dir)  # orig -> hf
    hf = load_family(hf_dir, device="cpu")
    back = tiny_llava_original.parent / "back-to-orig"
    hf.save_original(back, vision_tower="tiny-clip")  # hf -> orig
    back_sd, orig_sd = convert.load_state_dict_files(back), convert.load_state_dict_files(tiny_llava_original)
    assert back_sd.keys() == orig_sd.keys()
    assert all(torch.equal(back_sd[k], orig_sd[k]) for k in orig_sd)
    samples = [Sample(images[0], "What is in the image?", "A dog on the road."), Sample(None, "Hi", "Hello.")]
    a, b = orig.encode(samples), hf.encode(samples)
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        la, lb = orig.forward(a)[..., :base_vocab], hf.forward(b)[..., :base_vocab]
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


def test_key_map_round_trip() -> None:
    hf_keys = [
        "model.language_model.layers.3.mlp.up_proj.weight",
        "model.language_model.embed_tokens.weight",
        "model.multi_modal_projector.linear_1.bias",
        "model.vision_tower.vision_model.post_layernorm.weight",
        "lm_head.weight",
    ]
    orig = [convert.map_key(k, convert.HF_TO_ORIG) for k in hf_keys]
    assert orig == [
        "model.layers.3.mlp.up_proj.weight",
        "model.embed_tokens.weight",
        "model.mm_projector.0.bias",
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
        "lm_head.weight",
    ]
    assert [convert.map_key(k, convert.ORIG_TO_HF) for k in orig] == hf_keys


def test_answer_mask_covers_answer_and_eos(fam, images) -> None:
    batch = fam.encode([Sample(images[0], "Describe it.", "A red box on a table.")])
    toks = fam.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["answer_mask"][0]].tolist())
    assert fam.tokenizer.convert_tokens_to_string(toks[:-1]).strip() == "A red box on a table."
    assert toks[-1] == "</s>"
    assert int((batch["input_ids"][0] == fam.image_token_id).sum()) == (32 // 8) ** 2


def test_batched_greedy_equals_one_at_a_time(fam, images) -> None:
    samples = [
        Sample(images[0], "What is this?"),
        Sample(images[1], "Describe the image in detail please."),
        Sample(None, "Hello"),
        Sample(images[2], "Is there a dog?"),
    ]
    dec = GREEDY.replace(max_new_tokens=12)
    batched = generate(fam, samples, dec, batch_size=4)
    single = [generate(fam, [s], dec, batch_size=1)[0] for s in samples]
    assert batched == single
    assert len(set(batched)) > 1  # random weights still answer differently to different inputs


def test_seeded_sampling_repeatable_across_batching(fam, images) -> None:
    samples = [Sample(images[0], "What is this?")] * 3 + [Sample(images[1], "Describe.")]
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=10)
    seeds = [11, 12, 13, 14]
    a = generate(fam, samples, dec, seeds=seeds, batch_size=4)
    b = [generate(fam, [s], dec, seeds=[seed], batch_size=1)[0] for s, seed in zip(samples, seeds)]
    assert a == b
    assert len(set(a[:3])) > 1  # different seeds, same prompt -> different samples


def test_answer_logps_equal_direct_recomputation(fam, images) -> None:
    """Recompute from the raw model: logits of the full sequence, log-softmax, the answer's tokens by prompt length."""
    s = Sample(images[0], "What is in the image?", "Two cats and a dog.")
    got = answer_logps(fam, [s])[0]
    tok = fam.tokenizer
    prompt = render(s.question)
    n_prompt_text = len(tok(prompt, add_special_tokens=False)["input_ids"])
    full = (
        [tok.bos_token_id] + tok(prompt + " " + s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    )
    expanded = []
    for t in full:
        expanded += [t] * (16 if t == fam.image_token_id else 1)
    start = 1 + n_prompt_text + 15  # bos + prompt tokens (+15 for the image token's expansion)
    ids = torch.tensor([expanded])
    px = preprocess([s.image], fam.image_processor)
    with torch.no_grad():
        logits = fam.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    want = [lp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])]
    assert len(got.per_token) == len(want)
    assert got.per_token == pytest.approx(want, abs=1e-4)
    assert got.sum == pytest.approx(sum(want), abs=1e-3)
    assert got.mean == pytest.approx(sum(want) / len(want), abs=1e-4)


def test_yes_no_reads_the_right_tokens(fam, images) -> None:
    yes, no = yes_no_token_ids(fam)
    names = fam.tokenizer.convert_ids_to_tokens(yes + no)
    assert sorted(names) == sorted(["▁yes", "▁Yes", "▁no", "▁No"])
    s = Sample(images[1], "Is there a cat in the image?")
    p_yes, p_no = yes_no_probs(fam, [s, Sample(images[0], "Is it red? Answer yes or no please.")])[0]
    batch = fam.encode([s], for_generation=True)
    with torch.no_grad():
        probs = fam.forward(batch)[0, -1].softmax(-1)
    assert p_yes == pytest.approx(probs[yes].sum().item(), rel=1e-4)
    assert p_no == pytest.approx(probs[no].sum().item(), rel=1e-4)


def test_prefetched_runs_ahead_in_order_and_raises_at_the_failing_item() -> None:
    threads, started = set(), []
    release = threading.Event()

    def prepare(x: int) -> int:
        threads.add(threading.current_thread().name)
        started.append(x)
        if x == 3:
            raise ValueError("item 3 is broken")
        return x * x

    gen = prefetched(prepare, range(6))
    assert next(gen) == 0
    for _ in range(200):  # while the caller holds item 0, item 1 is prepared in the background
        if 1 in started:
            break
        release.wait(0.01)
    assert 1 in started
    assert [next(gen), next(gen)] == [1, 4]
    with pytest.raises(ValueError, match="item 3"):
        next(gen)
    assert threads == {"prefetch_0"}
    assert list(prefetched(prepare, [])) == []
    threads.clear()
    assert list(prefetched(prepare, [0, 1, 2], background=False)) == [0, 1, 4]  # inline, for models on the CPU
    assert threads == {threading.main_thread().name}


@pytest.mark.parametrize("background", [False, True])
def test_multi_batch_scoring_equals_one_batch(fam, images, monkeypatch, background) -> None:
    """Several batches give the one-batch numbers, prepared inline (models on the CPU) or each in the background
    while the previous one runs (models on a GPU; forced here)."""
    import muffin.inference

    monkeypatch.setattr(muffin.inference, "on_accelerator", lambda family: background)
    pairs = [
        (Sample(im, q, "A red square."), Sample(im, q, "Two cats and a dog on a mat."))
        for im, q in zip(images, ["What is it?", "Describe the image.", "What do you see?"])
    ]
    flat = [s for p in pairs for s in p]
    for packed in (True, False):
        one = answer_logps(fam, flat, batch_size=len(flat), packed=packed)
        many = answer_logps(fam, flat, batch_size=2, packed=packed)
        assert [len(a.per_token) for a in many] == [len(a.per_token) for a in one]
        assert sum((a.per_token for a in many), []) == pytest.approx(sum((a.per_token for a in one), []), abs=1e-5)
    questions = [Sample(im, f"Is there a {w}?") for im in images for w in ("cat", "dog red", "square")]
    for packed in (True, False):
        one = yes_no_probs(fam, questions, batch_size=len(questions), packed=packed)
        many = yes_no_probs(fam, questions, batch_size=3, packed=packed)
        assert np.allclose(many, one, atol=1e-6)


def test_lora_merge_matches_peft(tiny_llava, tmp_path, images) -> None:
    """An adapter saved by peft (and the same adapter renamed to the original layout) merges to peft's outputs."""
    from peft import LoraConfig, get_peft_model

    fam = load_family(tiny_llava, device="cpu")
    targets = fam.lora_target_modules()
    assert targets and all(".language_model." in f".{t}" for t in targets)
    peft_model = get_peft_model(fam.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    proj = peft_model.base_model.model.model.multi_modal_projector.linear_1
    proj.weight.data.add_(0.3)
    batch = fam.encode([Sample(images[0], "What is this?", "A box.")])
    with torch.no_grad():
        want = fam.forward(batch)
    peft_model.save_pretrained(tmp_path / "lora")
    from safetensors.torch import save_file

    save_file(
        {"model.multi_modal_projector.linear_1.weight": proj.weight.detach().clone()},
        str(tmp_path / "lora" / "non_lora_trainables.safetensors"),
    )
    merged = load_family(tiny_llava, device="cpu", lora_path=tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(merged.forward(batch), want, atol=1e-4, rtol=1e-4)
    # original layout: keys of the llava_llama model, projector in non_lora_trainables.bin
    from safetensors.torch import load_file

    ad = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    orig_dir = tmp_path / "lora-orig"
    orig_dir.mkdir()
    renamed = {
        "base_model.model." + convert.map_key(k.removeprefix("base_model.model."), convert.HF_TO_ORIG): v
        for k, v in ad.items()
    }
    torch.save(renamed, orig_dir / "adapter_model.bin")
    (orig_dir / "adapter_config.json").write_text((tmp_path / "lora" / "adapter_config.json").read_text())
    torch.save(
        {"base_model.model.model.mm_projector.0.weight": proj.weight.detach().clone()},
        orig_dir / "non_lora_trainables.bin",
    )
    merged2 = load_family(tiny_llava, device="cpu", lora_path=orig_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged2.forward(batch), want, atol=1e-4, rtol=1e-4)


def test_prompt_longer_than_context_is_a_clear_error(tiny_llava) -> None:
    fam = load_family(tiny_llava, device="cpu", max_length=64)
    with pytest.raises(ValueError, match=r"sample 0: the prompt is \d+ tokens.*context of 64"):
        fam.encode([Sample(None, "word " * 200)], for_generation=True)
    with pytest.raises(ValueError, match="sample 1: empty question"):
        fam.encode([Sample(None, "ok"), Sample(None, "  ")], for_generation=True)


def test_long_answer_is_truncated_never_the_prompt(tiny_llava, images) -> None:
    fam = load_family(tiny_llava, device="cpu", max_length=80)
    batch = fam.encode([Sample(images[0], "Describe.", "a dog " * 100), Sample(images[0], "Describe.", "A dog.")])
    assert batch["truncated"].tolist() == [True, False]
    assert batch["input_ids"].shape[1] == 80
    assert int((batch["input_ids"][0] == fam.image_token_id).sum()) == 16
    assert math.isfinite(answer_logps(fam, [Sample(images[0], "Describe.", "a dog " * 100)])[0].sum)
