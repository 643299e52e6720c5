"""RLAIFVChat from a path / PIL / base64, the family registry, and user-facing errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from chat import RLAIFVChat, main
from muffin.family import detect_family, family_class, load_family
from utils.images import image_to_base64, load_image


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8))
    path = tmp_path_factory.mktemp("img") / "photo.png"
    img.save(path)
    return path, img


def test_chat_from_path_pil_and_base64(tiny_llava, photo) -> None:
    path, img = photo
    bot = RLAIFVChat(tiny_llava, device="cpu")
    bot.decoding = bot.decoding.replace(max_new_tokens=8)
    q = "What is in the picture?"
    a = bot.chat({"image": str(path), "question": q})
    b = bot.chat({"image": img, "question": q})
    c = bot.chat({"image": image_to_base64(img), "question": q})
    assert isinstance(a, str) and a
    assert a == b == c
    assert bot.decoding.num_beams == 3 and not bot.decoding.do_sample  # the paper's LLaVA decoding


def test_chat_cli(tiny_llava, photo, capsys) -> None:
    assert (
        main(
            [
                "--model-path",
                str(tiny_llava),
                "--device",
                "cpu",
                "--image",
                str(photo[0]),
                "--question",
                "Hi?",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()
    assert main(["--model-path", str(tiny_llava), "--device", "cpu", "--image", "/nonexistent.jpg"]) == 1
    assert "'/nonexistent.jpg' is neither an existing image file" in capsys.readouterr().err


def test_chat_bad_inputs(tiny_llava, tmp_path) -> None:
    bot = RLAIFVChat(tiny_llava, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        bot.chat({"image": str(tmp_path / "missing.jpg"), "question": "q"})
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="corrupt.jpg.*cannot decode"):
        bot.chat({"image": str(bad), "question": "q"})
    with pytest.raises(ValueError, match="'question' is missing or empty"):
        bot.chat({"image": str(bad), "question": "   "})
    with pytest.raises(FileNotFoundError, match="is neither an existing image file nor base64 image data"):
        load_image("%%%notbase64%%%")


def test_family_read_from_config_not_path(tiny_llava, tmp_path) -> None:
    misleading = tmp_path / "omnilmm-12b-but-really-llava"
    shutil.copytree(tiny_llava, misleading)
    assert detect_family(misleading) == "llava"


def test_unknown_family_and_missing_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="unknown model family.*Known families: .*llava.*omnilmm"):
        detect_family(tmp_path)
    with pytest.raises(ValueError, match="Did you mean 'llava'"):
        family_class("lava")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_family(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_family(tmp_path / "nope")


def test_chat_with_no_arguments_describes_a_drawn_scene(capsys) -> None:
    """`python chat.py` alone: the shipped world policy describes scene 0 of the seed-0 test split (a red star, a
    yellow cross, a red moon) and names at least one object that is really there."""
    assert main(["--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "it holds: a red star, a yellow cross, a red moon" in out.err
    assert any(obj in out.out for obj in ("red star", "yellow cross", "red moon")), out.out


# What each family declares of the fast path, from docs/MODELS.md's list: the shared-prefix path for LLaVA 1.5,
# OmniLMM, LLaVA-NeXT, Idefics3; the plain path for Qwen2.5-VL (3-D M-RoPE), Gemma 3 (bidirectional image attention)
# and MiniCPM-V; one prefill per repeated prompt for the families on transformers' generation loop (LLaVA, OmniLMM).
FAST_PATHS = {
    "llava": (True, True),
    "omnilmm": (True, True),
    "minicpmv": (False, False),
    "llava_next": (True, False),
    "idefics3": (True, False),
    "qwen2_5_vl": (False, False),
    "gemma3": (False, False),
}


@pytest.mark.parametrize("arch", sorted(FAST_PATHS))
def test_every_family_declares_the_interface_and_its_fast_path(arch, tmp_path) -> None:
    """Each family's loaded object satisfies ``ModelFamily`` (``fast``, ``pad_id``, ``device`` included) and declares
    its fast path as documented; a family with ``fast.packing`` has the ``SharedPrefixModel`` hooks."""
    from muffin.family import FastPath, ModelFamily, SharedPrefixModel
    from utils.tiny_models import build_tiny

    fam = load_family(build_tiny(arch, tmp_path / arch), device="cpu", dtype="fp32")
    assert isinstance(fam, ModelFamily)
    assert isinstance(fam.fast, FastPath)
    assert (fam.fast.packing, fam.fast.shares_generation_prefix) == FAST_PATHS[arch]
    assert fam.fast.packed_attention == "auto" and fam.fast.compile_layers == "auto"
    assert not fam.fast.packing or isinstance(fam, SharedPrefixModel)
