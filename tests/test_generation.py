"""muffin.fast.generation: the static cache and the one prefill per distinct prompt give generate's own answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from muffin.decoding import CANDIDATE_SAMPLING, GREEDY
from muffin.family import Sample, load_family
from muffin.fast.generation import PrefixNotShareable, generate_new_ids
from muffin.inference import generate
from omnilmm.tiny import build_tiny_omnilmm


@pytest.fixture(scope="module")
def llava(tiny_llava: Path):
    return load_family(tiny_llava)


@pytest.fixture(scope="module")
def omnilmm(tmp_path_factory: pytest.TempPathFactory):
    return load_family(build_tiny_omnilmm(tmp_path_factory.mktemp("omnilmm") / "m"))


def _img(color: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def _repeated_prompts() -> list[Sample]:
    """Prompts sampled 4, 1, 3 and 2 times, as the generate stage lays them out (one image object per prompt):
    questions of different lengths (left padding differs per row), one prompt without an image, and the same image
    under two questions (a new run)."""
    red, blue = _img((200, 20, 20), (40, 30)), _img((10, 10, 220), (24, 48))
    prompts = [
        (Sample(red, "Describe the image in detail."), 4),
        (Sample(blue, "What is it?"), 1),
        (Sample(None, "Write one sentence about the sea, please."), 3),
        (Sample(red, "What colour is the thing in the middle of the picture?"), 2),
    ]
    return [s for s, k in prompts for _ in range(k)]


def _vision_rows(fam) -> tuple[list[int], object]:
    """Images per call of the image encoder (LLaVA's CLIP tower, OmniLMM's resampler, which timm's tower feeds
    through its blocks without a module call of its own), recorded by a forward hook; and the hook's handle."""
    seen: list[int] = []
    core = fam._core().model
    module = core.resampler if hasattr(core, "resampler") else core.vision_tower
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(int(args[0].shape[0])))
    return seen, handle


@pytest.mark.parametrize("name", ["llava", "omnilmm"])
def test_shared_prefix_gives_the_repeated_batch_answers(name: str, request: pytest.FixtureRequest) -> None:
    fam = request.getfixturevalue(name)
    samples = _repeated_prompts()
    seeds = list(range(100, 100 + len(samples)))
    sampled = CANDIDATE_SAMPLING.replace(max_new_tokens=10)
    greedy = GREEDY.replace(max_new_tokens=10)

    seen, handle = _vision_rows(fam)
    try:
        shared = generate(fam, samples, sampled, seeds=seeds, batch_size=len(samples))
        shared_greedy = generate(fam, samples, greedy, batch_size=len(samples))
    finally:
        handle.remove()
    # the three image prompts' images went through the tower once per call (not once per sampled row)
    assert seen == [3, 3]

    plain = generate(fam, samples, sampled, seeds=seeds, batch_size=len(samples), share_prefix=False)
    plain_greedy = generate(fam, samples, greedy, batch_size=len(samples), share_prefix=False)
    assert shared == plain
    assert shared_greedy == plain_greedy
    assert len(set(shared[:4])) > 1  # one prompt, four seeds: different samples
    # and batch boundaries that cut a run in two change nothing
    assert generate(fam, samples, sampled, seeds=seeds, batch_size=3) == shared


@pytest.mark.parametrize("name", ["llava", "omnilmm"])
def test_static_cache_equals_generates_default_cache(name: str, request: pytest.FixtureRequest) -> None:
    fam = request.getfixturevalue(name)
    samples = [Sample(_img((30, 160, 30), (32, 32)), "Is there a tree?"), Sample(None, "Hello, who are you?")]
    batch = fam.encode(samples, for_generation=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=fam.pad_id, eos_token_id=fam.tokenizer.eos_token_id)
    with torch.inference_mode():
        inputs = fam._inputs(batch)
        default = fam.model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1] :]  # transformers' DynamicCache
        ours = generate_new_ids(fam.model, inputs, **kw)
        shared = generate_new_ids(fam.model, inputs, repeats=[2, 1], **kw)
    assert torch.equal(ours, default)
    assert torch.equal(shared, default[[0, 0, 1]])


def test_generate_new_ids_errors(llava) -> None:
    batch = llava.encode([Sample(None, "Hi"), Sample(None, "Hello there")], for_generation=True)
    inputs = llava._inputs(batch)
    with pytest.raises(ValueError, match="each of the batch's 2 rows"):
        generate_new_ids(llava.model, inputs, repeats=[1], max_new_tokens=2)
    with pytest.raises(ValueError, match="each of the batch's 2 rows"):
        generate_new_ids(llava.model, inputs, repeats=[1, 0], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs max_new_tokens"):
        generate_new_ids(llava.model, inputs)
    with pytest.raises(ValueError, match="beam search expands its own rows"):
        generate_new_ids(llava.model, inputs, repeats=[2, 1], max_new_tokens=2, num_beams=2)


def test_shared_prefill_refuses_a_prompt_beyond_the_sliding_window(omnilmm) -> None:
    """A sliding-window layer's prefill cache drops the prefix's start once it outgrows the window; sharing it would
    copy a truncated prefix, so generate_new_ids refuses, naming the window, and ``generate`` falls back to running
    every row's prompt (here a window one token shorter than the prompt)."""
    img = _img((5, 5, 5), (20, 20))
    batch = omnilmm.encode([Sample(img, "Why?")], for_generation=True)
    inputs = omnilmm._inputs(batch)
    text = omnilmm.model.config.get_text_config(decoder=True)
    saved, text.sliding_window = text.sliding_window, inputs["input_ids"].shape[1] - 1
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=4)
    try:
        with pytest.raises(PrefixNotShareable, match="sliding window is"):
            generate_new_ids(omnilmm.model, inputs, repeats=[2], max_new_tokens=2)
        seen, handle = _vision_rows(omnilmm)
        try:
            shared = generate(omnilmm, [Sample(img, "Why?")] * 3, dec, seeds=[1, 2, 3])
        finally:
            handle.remove()
        assert seen == [3]  # the fallback ran each row's image
        assert shared == generate(omnilmm, [Sample(img, "Why?")] * 3, dec, seeds=[1, 2, 3], share_prefix=False)
    finally:
        text.sliding_window = saved


@pytest.mark.parametrize("setting", [{"use_cache": False}, {"cache_implementation": "dynamic"}])
def test_checkpoint_generation_config_does_not_switch_our_cache_off(llava, setting: dict) -> None:
    """The original LLaVA format and transformers' Trainer save use_cache=False (generate then runs without a cache,
    and a cache passed in overflowed); a generation config may name a cache_implementation (which generate refuses
    next to a cache passed in). Ours runs on either, with the answers of generate under that config."""
    samples = [Sample(_img((90, 90, 20), (30, 30)), "What is it?")] * 2 + [Sample(None, "Say hello.")]
    greedy = GREEDY.replace(max_new_tokens=6)
    config = llava.model.generation_config
    saved = {k: getattr(config, k) for k in setting}
    for k, v in setting.items():
        setattr(config, k, v)
    try:
        batch = llava.encode(samples, for_generation=True)
        kw = dict(
            max_new_tokens=6, do_sample=False, pad_token_id=llava.pad_id, eos_token_id=llava.tokenizer.eos_token_id
        )
        with torch.inference_mode():
            inputs = llava._inputs(batch)
            theirs = llava.model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1] :]
        assert generate(llava, samples, greedy) == llava.decode(theirs)
        assert generate(llava, samples, greedy, share_prefix=False) == llava.decode(theirs)
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
