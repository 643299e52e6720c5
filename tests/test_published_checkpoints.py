"""Every family against the PUBLISHED checkpoint files in ../shared/reference/checkpoints (issue 25).

Detection reads model_type and architectures; each published config builds (on the meta device, no memory) the
model its family loads, whose parameters map one to one onto the published weight names; the published tokenizers
load; tiny checkpoints made at run time from the published files load and run chat, generation, yes/no and DPO.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from muffin.family import UnsupportedCheckpoint, checkpoint_format, detect_family, load_family
from muffin.weights import check_coverage, drop_known_buffers

CKPTS = {
    "liuhaotian": "liuhaotian--llava-v1.5-7b",
    "llava_hf": "llava-hf--llava-1.5-7b-hf",
    "qwen": "Qwen--Qwen2.5-VL-7B-Instruct/modelscope-copy",
    "llava_next": "llava-hf--llava-v1.6-mistral-7b-hf/reconstructed",
    "omnilmm": "openbmb--OmniLMM-12B/reconstructed",
    "rlaifv12b": "openbmb--RLAIF-V-12B/reconstructed",
}


@pytest.fixture(scope="module")
def ckpt(reference_dir: Path):
    """``ckpt(name)``: the published folder of a checkpoint; skips when the reference copy lacks it."""

    def get(name: str) -> Path:
        path = reference_dir / "checkpoints" / CKPTS[name]
        if not (path / "config.json").is_file():
            pytest.skip(f"{path} not present")
        return path

    return get


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _weight_map(path: Path) -> dict[str, str]:
    index = next(path.glob("*.index.json"))
    return json.loads(index.read_text())["weight_map"]


# ---------------------------------------------------------------------------------------------- detection
def test_published_configs_are_detected_by_model_type_and_architectures(ckpt) -> None:
    """liuhaotian's config says model_type "llava" but architectures LlavaLlamaForCausalLM: the ORIGINAL format."""
    expected = {
        "liuhaotian": ("llava", "llava-original"),
        "llava_hf": ("llava", "llava-hf"),
        "qwen": ("hf_vlm", "hf_vlm"),
        "llava_next": ("hf_vlm", "hf_vlm"),
        "omnilmm": ("omnilmm", "omnilmm"),
        "rlaifv12b": ("omnilmm", "omnilmm"),
    }
    for name, (family, layout) in expected.items():
        fmt = checkpoint_format(_config(ckpt(name)), name)
        assert (fmt.family, fmt.layout) == (family, layout), name
    liu = _config(ckpt("liuhaotian"))
    assert liu["model_type"] == "llava" and liu["architectures"] == ["LlavaLlamaForCausalLM"]
    # RLAIF-V-7B's hub page says llava_llama: the same loader under the later model_type
    assert checkpoint_format({**liu, "model_type": "llava_llama"}).layout == "llava-original"


@pytest.mark.parametrize(
    "config, match",
    [
        ({"model_type": "llava"}, r"needs \['text_config', 'vision_config'\]"),  # would be transformers' default 7B
        ({"model_type": "llava", "architectures": ["LlavaMistralForCausalLM"]}, "either LlavaLlamaForCausalLM"),
        ({"model_type": "llava_llama", "architectures": ["LlamaForCausalLM"]}, "needs architectures"),
        ({"model_type": "llama", "architectures": ["LlavaLlamaForCausalLM"]}, "whose model_type is llava"),
        ({"model_type": "omnilmm", "architectures": ["MistralForCausalLM"]}, "OmniLMMForCausalLM"),
        ({"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLModel"]}, "Qwen2_5_VLForConditionalGeneration"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, "no loader reads"),
    ],
)
def test_configs_matching_no_loader_exactly_are_refused(config: dict, match: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpoint, match=match):
        detect_family(tmp_path)
    with pytest.raises(UnsupportedCheckpoint, match="unknown model family"):
        load_family(tmp_path, device="cpu")  # refused before anything is built


def test_forcing_a_family_on_the_wrong_layout_is_refused(ckpt, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((ckpt("qwen") / "config.json").read_text())
    with pytest.raises(ValueError, match="hf_vlm checkpoint, not LLaVA"):
        load_family(tmp_path, family="llava", device="cpu")


def test_coverage_check_names_missing_unexpected_and_drops_inv_freq_by_name() -> None:
    model = {"a.weight": (2, 3), "b.weight": (4,)}
    check_coverage(model, {"a.weight": (2, 3), "b.weight": None, "x.rotary_emb.inv_freq": (8,)}, "ckpt")
    with pytest.raises(KeyError, match=r"1 model parameters are not in the checkpoint: b\.weight"):
        check_coverage(model, {"a.weight": (2, 3)}, "ckpt")
    with pytest.raises(KeyError, match=r"have no place in the model: c\.bias"):
        check_coverage(model, {"a.weight": (2, 3), "b.weight": (4,), "c.bias": (1,)}, "ckpt")
    with pytest.raises(KeyError, match=r"a\.weight: checkpoint \(3, 2\) vs model \(2, 3\)"):
        check_coverage(model, {"a.weight": (3, 2), "b.weight": (4,)}, "ckpt")
    assert set(drop_known_buffers({"model.layers.0.self_attn.rotary_emb.inv_freq": 0, "k": 1})) == {"k"}


# ---------------------------------------------------------------------------------------------- tokenizers
TEXTS = [
    "Hello world",
    "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nWhat is in the "
    "image? ASSISTANT: A dog.</s>",  # the llava_v1 template, image token included
    "héllo wörld: 日本語のテキスト, emoji 😀👍🏽, Ελληνικά, العربية",
    "line one\nline two\n\n\tindented\r\nwindows",
    " leading space",
    "  two leading spaces and  double  inner",
    "trailing space ",
    "<image>\nDescribe the image.",
    "Is there a dog in the image? Answer yes or no. ASSISTANT: Yes",
    "numbers 1234567 and 3.14159, punctuation!?;:'\"()[]{}",
]


def test_liuhaotian_sentencepiece_tokenizer_equals_llava_hf(ckpt) -> None:
    """liuhaotian ships only tokenizer.model; as the LLaVA family loads it (``<image>``, ``<pad>`` added) its ids
    equal those of llava-hf's published tokenizer.json (the same Llama-2 model, converted by llava-hf), and each
    text piece equals what sentencepiece itself gives (a '▁' before every piece, also after a special token)."""
    pytest.importorskip("sentencepiece")
    import sentencepiece as spm

    from llava.family import original_tokenizer
    from utils.tokenizer import load_tokenizer

    liu, hf = original_tokenizer(ckpt("liuhaotian")), load_tokenizer(ckpt("llava_hf"))
    assert not (ckpt("liuhaotian") / "tokenizer.json").exists()
    assert (len(liu), len(hf)) == (32002, 32002)
    assert liu.convert_tokens_to_ids(["<image>", "<pad>"]) == hf.convert_tokens_to_ids(["<image>", "<pad>"])
    assert liu.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    sp = spm.SentencePieceProcessor(model_file=str(ckpt("liuhaotian") / "tokenizer.model"))
    for text in TEXTS:
        ids = liu(text).input_ids
        assert ids == hf(text).input_ids, text
        # special tokens stay whole; sentencepiece encodes each piece of text between them on its own
        pieces = re.split(r"(<image>|</s>)", text)
        want = [1] + [t for p in pieces if p for t in ({"<image>": [32000], "</s>": [2]}.get(p) or sp.encode(p))]
        assert ids == want, text
        assert liu.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert liu(" leading space").input_ids == [1, 29871, 8236, 2913]  # '▁' (29871) then '▁leading'


def test_sentencepiece_tokenizer_without_its_packages_names_them(ckpt, monkeypatch) -> None:
    import utils.tokenizer

    monkeypatch.setattr(utils.tokenizer, "_installed", lambda module: module != "google.protobuf")
    with pytest.raises(ImportError, match=r"needs the packages sentencepiece and protobuf \(protobuf not installed\)"):
        utils.tokenizer.load_tokenizer(ckpt("liuhaotian"))


# ---------------------------------------------------------------------------------------------- full-size on meta
CLIP_L336_VISION = 303_507_456  # embeddings 1,193,984 + 2 LayerNorms 4,096 + 24 layers x 12,596,224
LLAVA_7B_LM = 6_759_395_328  # Llama-2-7B at vocab 32000 (6,738,415,616) + the mlp2x_gelu projector (20,979,712)


def _numel(model: torch.nn.Module, skip: str = "") -> int:
    return sum(v.numel() for k, v in model.state_dict().items() if not (skip and k.startswith(skip)))


def test_liuhaotian_index_maps_one_to_one_on_the_original_loader_model(ckpt) -> None:
    """The 327 published names (32 of them inv_freq buffers) after ``llava.convert.orig_to_hf_state_dict`` are
    exactly the parameters of the model ``load_original`` builds, minus the CLIP tower (not in liuhaotian's files).

    Shapes, by bytes: index total_size 13,518,798,848 = 2 bytes x 6,759,395,328 fp16 parameters + 4 bytes x
    32 layers x 64 fp32 inv_freq. By hand: embed + lm_head 2 x 32000 x 4096; per layer 4 x 4096^2 (attention)
    + 3 x 4096 x 11008 (MLP) + 2 x 4096 (norms), 32 layers; final norm 4096; projector 1024x4096 + 4096 +
    4096x4096 + 4096.
    """
    from llava import convert
    from llava.family import meta_model, original_llava_config, original_tokenizer

    path = ckpt("liuhaotian")
    cfg = _config(path)
    model = meta_model(original_llava_config(path, cfg, original_tokenizer(path)))
    weight_map = _weight_map(path)
    assert len(weight_map) == 327 and sum("inv_freq" in k for k in weight_map) == 32
    flat = convert.has_flat_vision(model)
    renamed = convert.orig_to_hf_state_dict(dict.fromkeys(weight_map), flat)
    tower = "model.vision_tower."
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(tower)}
    check_coverage(expected, renamed, str(path))  # one to one: nothing missing, nothing unexpected
    text = model.config.text_config
    grown = 2 * (text.vocab_size - cfg["vocab_size"]) * text.hidden_size  # rows for <image>, <pad> and padding
    n = _numel(model, skip=tower) - grown
    assert n == LLAVA_7B_LM
    head_half = text.hidden_size // text.num_attention_heads // 2
    total = json.loads((path / "pytorch_model.bin.index.json").read_text())["metadata"]["total_size"]
    assert total == 2 * n + 4 * text.num_hidden_layers * head_half
    assert _numel(model.model.vision_tower) == CLIP_L336_VISION  # the tower mm_vision_tower names


def test_rlaifv_7b_parameter_count_with_its_tower(ckpt) -> None:
    """openbmb/RLAIF-V-7B (no published file found): its hub page says llava_llama, 7.06B parameters with the CLIP
    tower. Its config is reconstructed as liuhaotian's with model_type llava_llama (SOURCES.md of RLAIF-V-7B):
    6,759,395,328 + 303,507,456 = 7,062,902,784 -> "7.06B"."""
    from llava.family import meta_model, original_llava_config, original_tokenizer

    path = ckpt("liuhaotian")
    cfg = {**_config(path), "model_type": "llava_llama", "torch_dtype": "bfloat16"}
    assert checkpoint_format(cfg).layout == "llava-original"
    model = meta_model(original_llava_config(path, cfg, original_tokenizer(path)))
    text = model.config.text_config
    n = _numel(model) - 2 * (text.vocab_size - cfg["vocab_size"]) * text.hidden_size
    assert n == LLAVA_7B_LM + CLIP_L336_VISION
    assert round(n / 1e9, 2) == 7.06


@pytest.mark.parametrize("name", ["llava_hf", "qwen"])
def test_transformers_index_maps_one_to_one_on_the_family_model(ckpt, name: str) -> None:
    """llava-hf (686 names, pre-v5 layout) and Qwen2.5-VL (729 names): transformers' own load-time renames map every
    published name onto one parameter of the model the family builds, and total_size (bytes) is 2 bytes per
    parameter (fp16 / bf16, no buffers). llava-hf by hand: 6,759,395,328 + 2 x 64 x 4096 (vocab 32064) + CLIP."""
    from muffin.hf_vlm import meta_model as hf_meta
    from muffin.weights import model_tensors, tied_aliases, transformers_key_map

    path = ckpt(name)
    if name == "llava_hf":
        from transformers import LlavaConfig

        from llava.family import meta_model

        model = meta_model(LlavaConfig.from_pretrained(path))
    else:
        model = hf_meta(path)
    weight_map = _weight_map(path)
    renamed = transformers_key_map(model, weight_map)
    assert len(set(renamed.values())) == len(weight_map) == {"llava_hf": 686, "qwen": 729}[name]
    check_coverage(model_tensors(model), dict.fromkeys(renamed.values()), str(path), aliases=tied_aliases(model))
    total = json.loads(next(path.glob("*.index.json")).read_text())["metadata"]["total_size"]
    assert total == 2 * _numel(model)
    if name == "llava_hf":
        assert _numel(model) == LLAVA_7B_LM + 2 * 64 * 4096 + CLIP_L336_VISION


def test_llava_next_mistral_config_builds_the_published_size(ckpt) -> None:
    """No index was found for llava-hf/llava-v1.6-mistral-7b-hf; hub pages of the same architecture show "7.57B"."""
    from muffin.hf_vlm import meta_model

    model = meta_model(ckpt("llava_next"))
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert round(_numel(model) / 1e9, 2) == 7.57


def test_omnilmm_12b_configs_build_the_published_layout(ckpt) -> None:
    """OmniLMM-12B and RLAIF-V-12B (reconstructed configs; no index found) build through ``OmniLMMFamily``'s model.

    RLAIF-V-12B's hub listing: five bf16 shards of 4.94 + 5 + 4.96 + 4.97 + 3.36 = 23.23 GB (each rounded to
    10 MB), and an index of 1137 lines, i.e. 1130 names (transformers writes 7 lines around one line per name).
    The model's state dict (the resampler's fixed pos_embed included, saved as the original's frozen parameter)
    holds 1130 tensors of 11,615,965,952 elements = 23.232 GB in bf16.
    """
    from omnilmm.config import OmniLMMConfig
    from omnilmm.modeling import OmniLMMForCausalLM

    for name in ("omnilmm", "rlaifv12b"):
        config = OmniLMMConfig.from_pretrained(ckpt(name))
        assert checkpoint_format(_config(ckpt(name))).family == "omnilmm"
        with torch.device("meta"):
            model = OmniLMMForCausalLM(config)
        state = model.state_dict()
        assert len(state) == 1137 - 7
        n = _numel(model)
        assert abs(2 * n / 1e9 - (4.94 + 5 + 4.96 + 4.97 + 3.36)) <= 5 * 0.005
        assert config.num_query == 256 and state["model.resampler.query"].shape == (256, 4096)
        assert state["model.resampler.kv_proj.weight"].shape == (4096, 1792)  # EVA02-enormous width 1792
        # 64 EVA02 blocks, the last replaced by identity (penultimate features) as the original does: 63 stored
        assert sum(k.startswith("model.vision_tower.blocks.") and k.endswith(".norm1.weight") for k in state) == 63
