"""OmniLMM family on a tiny random checkpoint: published key layout, save/load, splice, chat format, interface."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from muffin.decoding import CANDIDATE_SAMPLING, GREEDY, OMNILMM_CHAT
from muffin.family import Sample, detect_family, load_family
from muffin.fast.logps import token_logps
from muffin.inference import answer_logps, generate, yes_no_probs, yes_no_token_ids
from omnilmm.config import IM_END, IM_PATCH, IM_START, OMNILMM_SYSTEM
from omnilmm.tiny import TINY_VISION


@pytest.fixture(scope="module")
def tiny_omnilmm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from utils.tiny_models import build_tiny

    return build_tiny("omnilmm", tmp_path_factory.mktemp("tiny-omnilmm"))


@pytest.fixture(scope="module")
def fam(tiny_omnilmm: Path):
    return load_family(tiny_omnilmm, device="cpu", dtype=torch.float32)


def _img(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_detect_and_published_key_layout(tiny_omnilmm: Path) -> None:
    """Keys as the original OmniLMMForCausalLM names them; the vision keys are exactly a fresh timm tower's
    (built here directly with timm) minus the replaced last block, under model.vision_tower."""
    import timm

    assert detect_family(tiny_omnilmm) == "omnilmm"
    keys = set(load_file(str(tiny_omnilmm / "model.safetensors")))
    cfg = json.loads((tiny_omnilmm / "config.json").read_text())
    assert cfg["model_type"] == "omnilmm" and cfg["num_query"] == 4 and cfg["image_size"] == 56
    ref = timm.create_model("eva02_enormous_patch14_clip_224", pretrained=False, num_classes=0, **TINY_VISION)
    last = f"blocks.{TINY_VISION['depth'] - 1}."
    want_vision = {f"model.vision_tower.{k}" for k in ref.state_dict() if not k.startswith(last)}
    want_resampler = {
        f"model.resampler.{k}"
        for k in (
            "query",
            "pos_embed",
            "proj",
            "kv_proj.weight",
            "attn.in_proj_weight",
            "attn.in_proj_bias",
            "attn.out_proj.weight",
            "attn.out_proj.bias",
            "ln_q.weight",
            "ln_q.bias",
            "ln_kv.weight",
            "ln_kv.bias",
            "ln_post.weight",
            "ln_post.bias",
        )
    }
    want_lm = {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
    }
    assert keys == want_vision | want_resampler | want_lm


def test_save_load_round_trip(fam, tmp_path: Path) -> None:
    batch = fam.encode([Sample(_img((9, 99, 200)), "Describe the image.", "A blue square.")])
    before = fam.forward(batch)
    fam.save_pretrained(tmp_path / "copy")
    again = load_family(tmp_path / "copy", device="cpu", dtype=torch.float32)
    sd_a, sd_b = fam.model.state_dict(), again.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # timm's non-persistent zero key bias is in no checkpoint: it must be rebuilt as zeros on load
    k_bias = [b for n, b in again.model.named_buffers() if n.endswith("attn.k_bias")]
    assert k_bias and all(bool((b == 0).all()) for b in k_bias)
    torch.testing.assert_close(again.forward(batch), before)


def test_mismatched_checkpoint_keys_are_named(tiny_omnilmm: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_omnilmm, bad)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["model.resampler.query"]
    sd["model.resampler.extra"] = torch.zeros(1)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.resampler\.query.*|model\.resampler\.extra"):
        load_family(bad, device="cpu")


def test_config_without_num_query_is_refused(tiny_omnilmm: Path, tmp_path: Path) -> None:
    bad = tmp_path / "noq"
    shutil.copytree(tiny_omnilmm, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["num_query"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_query"):
        load_family(bad, device="cpu")


def test_chat_format_and_answer_mask(fam) -> None:
    """Zephyr turns with our system prompt, the image span before the question; the answer mask is the answer
    plus </s>, and the generation prompt is exactly the tokens before it."""
    s = Sample(_img((1, 2, 3)), "Is there a dog?", "Yes, there is.")
    prompt_ids = fam.encode([s], for_generation=True)["input_ids"][0]
    text = fam.tokenizer.decode(prompt_ids)
    span = IM_START + IM_PATCH * 4 + IM_END
    assert text.startswith("<s>") and text.endswith("<|assistant|>\n")
    assert f"<|system|>\n{OMNILMM_SYSTEM}</s>\n<|user|>\n{span}\nIs there a dog?</s>\n" in text
    batch = fam.encode([s])
    ids, mask = batch["input_ids"][0], batch["answer_mask"][0]
    n = int(mask.nonzero()[0, 0])
    assert torch.equal(ids[:n], prompt_ids)
    assert fam.tokenizer.decode(ids[mask]) == "Yes, there is.</s>"
    assert bool(mask[n:].all())  # nothing after the answer (single row: no padding)


def test_splice_matches_manual_embedding(fam) -> None:
    """Logits of a mixed batch (image / text-only / image) equal Mistral run on embeddings we assemble by hand:
    token embeddings with image k's resampled features written at the k-th span's <im_patch> positions."""
    samples = [
        Sample(_img((200, 10, 10)), "What is it?", "A red thing."),
        Sample(None, "Say no.", "No"),
        Sample(_img((10, 10, 200), (20, 50)), "Describe the image in detail.", "Blue."),
    ]
    batch = fam.encode(samples)
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    m = fam.model
    with torch.no_grad():
        feats = m.model.image_features(batch["pixel_values"])  # (2, 4, H)
        emb = m.model.embed_tokens(batch["input_ids"]).clone()
        patch = m.config.im_patch_token_id
        img = 0
        for b in range(3):
            pos = [t for t in range(batch["input_ids"].shape[1]) if int(batch["input_ids"][b, t]) == patch]
            assert len(pos) == (0 if samples[b].image is None else 4)
            for k, t in enumerate(pos):
                emb[b, t] = feats[img, k]
            img += bool(pos)
        mask = batch["attention_mask"]
        want = m(inputs_embeds=emb, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = fam.forward(batch)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(feats[0], feats[1])  # the two images really differ


def test_text_only_row_unaffected_by_batchmates(fam) -> None:
    alone = fam.encode([Sample(None, "Say no.", "No")])
    mixed = fam.encode([Sample(None, "Say no.", "No"), Sample(_img((5, 5, 5)), "Describe the image.", "Dark.")])
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(fam.forward(mixed)[0, :n], fam.forward(alone)[0], atol=1e-5, rtol=1e-4)


def test_marker_errors(fam) -> None:
    batch = fam.encode([Sample(_img((1, 1, 1)), "Q?")], for_generation=True)
    ids = batch["input_ids"].clone()
    end = fam.model.config.im_end_token_id
    ids[ids == end] = fam.tokenizer.convert_tokens_to_ids("<s>")
    with pytest.raises(ValueError, match="<im_start>"):
        fam.forward({**batch, "input_ids": ids})
    with pytest.raises(ValueError, match="1 image spans .* 0 images"):
        fam.forward({k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="sample 0: empty question"):
        fam.encode([Sample(None, "  ")])


def test_inference_helpers(fam) -> None:
    """yes/no ids are distinct; P(yes)/P(no) of a sample do not depend on its batch; logps sum per token."""
    yes, no = yes_no_token_ids(fam)
    assert yes and no and not set(yes) & set(no)
    qs = [
        Sample(_img((200, 10, 10)), "Is there a dog?"),
        Sample(None, "Is it red?"),
        Sample(_img((0, 90, 0), (64, 64)), "Is there a red circle in the picture?"),
    ]
    batched = yes_no_probs(fam, qs, batch_size=3)
    single = [yes_no_probs(fam, [q])[0] for q in qs]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-6, rtol=1e-4)
    s = Sample(_img((3, 3, 3)), "What is it?", "A cat.")
    lp = answer_logps(fam, [s])[0]
    batch = fam.encode([s])
    with torch.no_grad():
        logps, mask = token_logps(fam.forward(batch), batch["input_ids"], batch["answer_mask"])
    assert len(lp.per_token) == int(batch["answer_mask"].sum()) and lp.sum == pytest.approx(float(logps.sum()))


def test_generation_decodings(fam) -> None:
    qs = [Sample(_img((200, 10, 10)), "Describe the image."), Sample(None, "Hi?"), Sample(_img((0, 0, 200)), "Why?")]
    greedy = generate(fam, qs, GREEDY.replace(max_new_tokens=4), batch_size=3)
    assert greedy == [generate(fam, [q], GREEDY.replace(max_new_tokens=4))[0] for q in qs]
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=4)
    together = generate(fam, qs, dec, seeds=[7, 8, 9], batch_size=3)
    apart = [generate(fam, [q], dec, seeds=[s])[0] for q, s in zip(qs, [7, 8, 9])]
    assert together == apart
    chat = generate(fam, qs[:1], OMNILMM_CHAT.replace(max_new_tokens=4), seeds=[1])
    assert len(chat) == 1 and isinstance(chat[0], str)


def test_training_hooks_lora(fam) -> None:
    """LoRA lands on the Mistral linears only; one backward reaches the adapters and the resampler, not the tower."""
    from peft import LoraConfig, get_peft_model

    targets = fam.lora_target_modules()
    assert len(targets) == 2 * 7 and all(t.startswith("model.layers.") for t in targets)
    assert fam.trainable_modules() == ["model.resampler"] and fam.frozen_modules() == ["model.vision_tower"]
    import copy

    model = copy.deepcopy(fam.model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(".model.layers." in n for n in lora)
    for n, p in peft_model.named_parameters():
        if ".resampler." in n:
            p.requires_grad_(True)
    batch = fam.encode([Sample(_img((3, 30, 90)), "What is it?", "A cat.")])
    mask = batch["attention_mask"]
    logits = peft_model(input_ids=batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"]).logits
    logps, m = token_logps(logits, batch["input_ids"], batch["answer_mask"])
    (-logps.sum()).backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    assert all(grads[n] is not None for n in lora if "lora_B" in n)
    assert grads["base_model.model.model.resampler.query"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if ".vision_tower." in n)
