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
    from muffin.hf_vlm.family import meta_model as hf_meta
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
    from muffin.hf_vlm.family import meta_model

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


# ---------------------------------------------------------------------------------------------- tiny, from published
# Only widths shrink: layer counts, vocabularies, model_type, architectures, mm_* fields and the hub id in
# mm_vision_tower stay as published, so every published weight name is carried (at a tiny shape).
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16)
TINY_IMAGE = 28  # patch 14 as published: 2 x 2 = 4 image tokens
CLIP_HUB_ID = "openai/clip-vit-large-patch14-336"


def _copy(src: Path, dst: Path, names: list[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())


def _write_shards(
    out: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str], index_name: str, safetensors: bool
) -> None:
    """Write ``tensors`` into the published shard files, each name in the shard the published index puts it in."""
    from safetensors.torch import save_file

    assert set(tensors) == set(weight_map)
    for shard in sorted(set(weight_map.values())):
        part = {k: tensors[k].contiguous().clone() for k, f in weight_map.items() if f == shard}
        if safetensors:
            save_file(part, str(out / shard), metadata={"format": "pt"})
        else:
            torch.save(part, out / shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_clip_cache(cache: Path) -> Path:
    """A Hugging Face cache holding a tiny CLIP (text + vision, as openai's repo) under the published tower's hub id;
    24 vision layers as CLIP ViT-L, patch 14 at 28 px."""
    from transformers import CLIPConfig, CLIPModel

    snapshot = cache / ("models--" + CLIP_HUB_ID.replace("/", "--")) / "snapshots" / ("0" * 40)
    vision = dict(TINY_CLIP, num_hidden_layers=24, image_size=TINY_IMAGE, patch_size=14)
    text = dict(TINY_CLIP, num_hidden_layers=2, vocab_size=64, max_position_embeddings=16)
    torch.manual_seed(1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return snapshot


def build_tiny_liuhaotian(published: Path, out: Path, tower: Path) -> Path:
    """liuhaotian/llava-v1.5-7b shrunk: its config.json with TINY_TEXT widths (mm_hidden_size = the tower's), its
    tokenizer files, and two .bin shards + pytorch_model.bin.index.json holding all 327 published names (the 32
    fp32 inv_freq buffers included), each in the shard the published index names, in fp16 as published."""
    from transformers import LlavaForConditionalGeneration

    from llava import convert
    from llava.family import original_llava_config, original_tokenizer

    cfg = {**_config(published), **TINY_TEXT, "mm_hidden_size": TINY_CLIP["hidden_size"]}
    _copy(published, out, ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"])
    _copy(published, out, ["generation_config.json"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(original_llava_config(out, cfg, original_tokenizer(out), tower))
    state = convert.hf_to_orig_state_dict(model.state_dict())
    state = {k: v.to(torch.float16) for k, v in state.items() if not k.startswith("model.vision_tower.")}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][: cfg["vocab_size"]]  # the published vocabulary: no <image>/<pad> rows
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head, 2, dtype=torch.float32) / head)
    for i in range(cfg["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    _write_shards(out, state, _weight_map(published), "pytorch_model.bin.index.json", safetensors=False)
    return out


def build_tiny_llava_hf(published: Path, out: Path) -> Path:
    """llava-hf/llava-1.5-7b-hf shrunk: text_config / vision_config widths (layer counts as published: 32 from the
    Llama default the published text_config relies on, 24), image size 28 in config and preprocessor, the tokenizer,
    chat-template and processor files, three safetensors shards with the 686 published (pre-v5) names."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava.family import meta_model
    from muffin.weights import transformers_key_map

    cfg = _config(published)
    cfg["text_config"] = {**cfg["text_config"], **TINY_TEXT}
    cfg["vision_config"] = {**cfg["vision_config"], **TINY_CLIP, "image_size": TINY_IMAGE}
    files = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    files += ["added_tokens.json", "chat_template.json", "chat_template.jinja", "processor_config.json"]
    _copy(published, out, files + ["generation_config.json"])
    pre = json.loads((published / "preprocessor_config.json").read_text())
    pre.update(crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE}, size={"shortest_edge": TINY_IMAGE})
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    weight_map = _weight_map(published)
    config = LlavaConfig.from_pretrained(out)
    published_to_model = transformers_key_map(meta_model(config), weight_map)
    torch.manual_seed(0)
    state = LlavaForConditionalGeneration(config).state_dict()
    tensors = {k: state[m].to(torch.float16) for k, m in published_to_model.items()}
    _write_shards(out, tensors, weight_map, "model.safetensors.index.json", safetensors=True)
    return out


def build_tiny_rlaifv_7b(published: Path, out: Path, tower: Path) -> Path:
    """openbmb/RLAIF-V-7B as its hub page describes it (no file of it was found): liuhaotian's files with
    model_type "llava_llama", bf16, and the CLIP tower inside three safetensors shards under the original layout's
    ``model.vision_tower.vision_tower.vision_model.*`` names (no inv_freq: transformers >= 4.32 does not save it)."""

    from transformers import LlavaForConditionalGeneration

    from llava import convert
    from llava.family import original_llava_config, original_tokenizer

    cfg = {**_config(published), **TINY_TEXT, "mm_hidden_size": TINY_CLIP["hidden_size"]}
    cfg.update(model_type="llava_llama", torch_dtype="bfloat16")
    _copy(published, out, ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    torch.manual_seed(2)
    model = LlavaForConditionalGeneration(original_llava_config(out, cfg, original_tokenizer(out), tower))
    state = {k: v.to(torch.bfloat16) for k, v in convert.hf_to_orig_state_dict(model.state_dict()).items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][: cfg["vocab_size"]]
    names = sorted(state)
    weight_map = {k: f"model-0000{1 + 3 * i // len(names)}-of-00003.safetensors" for i, k in enumerate(names)}
    _write_shards(out, state, weight_map, "model.safetensors.index.json", safetensors=True)
    return out


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory: pytest.TempPathFactory):
    """The tiny CLIP tower in a Hugging Face cache that the hub client reads for this module's tests."""
    import huggingface_hub.constants as hub

    cache = tmp_path_factory.mktemp("hf-cache")
    snapshot = build_clip_cache(cache)
    saved = hub.HF_HUB_CACHE
    hub.HF_HUB_CACHE = str(cache)
    yield snapshot
    hub.HF_HUB_CACHE = saved


@pytest.fixture(scope="module")
def tiny_liuhaotian(ckpt, clip_cache, tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece")
    return build_tiny_liuhaotian(ckpt("liuhaotian"), tmp_path_factory.mktemp("liuhaotian-tiny"), clip_cache)


@pytest.fixture(scope="module")
def tiny_llava_hf(ckpt, tmp_path_factory) -> Path:
    return build_tiny_llava_hf(ckpt("llava_hf"), tmp_path_factory.mktemp("llava-hf-tiny"))


def test_tiny_liuhaotian_carries_the_published_layout(ckpt, tiny_liuhaotian: Path) -> None:
    published = _config(ckpt("liuhaotian"))
    cfg = _config(tiny_liuhaotian)
    changed = {k for k in published if cfg[k] != published[k]}
    assert changed == set(TINY_TEXT) | {"mm_hidden_size"}
    assert cfg["mm_vision_tower"] == CLIP_HUB_ID and cfg["architectures"] == ["LlavaLlamaForCausalLM"]
    assert _weight_map(tiny_liuhaotian) == _weight_map(ckpt("liuhaotian"))
    assert sorted(p.name for p in tiny_liuhaotian.glob("*.bin")) == sorted(set(_weight_map(tiny_liuhaotian).values()))


def test_vision_tower_found_in_the_cache_or_given_or_the_error_says_how(tiny_liuhaotian, clip_cache, tmp_path) -> None:
    """mm_vision_tower is the hub id: found in the hub cache, or passed as vision_tower=DIR; else the error names
    the hub id, the command that downloads it and the option that points at a directory."""
    import huggingface_hub.constants as hub

    a = load_family(tiny_liuhaotian, device="cpu")
    b = load_family(tiny_liuhaotian, device="cpu", vision_tower=clip_cache)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    saved, hub.HF_HUB_CACHE = hub.HF_HUB_CACHE, str(tmp_path / "empty-cache")
    try:
        with pytest.raises(FileNotFoundError) as err:
            load_family(tiny_liuhaotian, device="cpu")
    finally:
        hub.HF_HUB_CACHE = saved
    msg = str(err.value)
    assert f"huggingface-cli download {CLIP_HUB_ID}" in msg and "vision_tower=DIR" in msg and "--local-dir" in msg


def test_original_loader_refuses_missing_and_unexpected_tensors(tiny_liuhaotian, clip_cache, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_liuhaotian, bad)
    index = json.loads((bad / "pytorch_model.bin.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    part = torch.load(bad / shard, weights_only=True)
    del part["model.norm.weight"]
    part["model.extra_head.weight"] = torch.zeros(2)
    torch.save(part, bad / shard)
    with pytest.raises(
        KeyError, match=r"not in the checkpoint: model\.language_model\.norm\.weight.*no place in the "
    ):
        load_family(bad, device="cpu")


def test_original_config_without_its_sizes_is_refused_before_building(tiny_liuhaotian, tmp_path) -> None:
    """Without hidden_size LlamaConfig would build its default 4096-wide model: refused, naming the field."""
    import shutil

    bad = tmp_path / "no-hidden-size"
    shutil.copytree(tiny_liuhaotian, bad)
    cfg = _config(bad)
    del cfg["hidden_size"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lacks \['hidden_size'\].*refusing to build one from default sizes"):
        load_family(bad, device="cpu")


def test_llava_hf_files_checked_against_the_config_before_loading(tiny_llava_hf, tmp_path, monkeypatch) -> None:
    """A config wider than its files is refused from the safetensors headers, before from_pretrained runs."""
    import shutil

    from transformers import LlavaForConditionalGeneration

    bad = tmp_path / "wider"
    shutil.copytree(tiny_llava_hf, bad)
    cfg = _config(bad)
    cfg["text_config"]["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained ran on a checkpoint that does not match its config")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", never)
    with pytest.raises(KeyError, match=r"shapes differ: model\.language_model\.layers\.0\.mlp\.down_proj\.weight: "):
        load_family(bad, device="cpu")


def test_tiny_rlaifv_7b_loads_its_own_tower(ckpt, clip_cache, tmp_path) -> None:
    """The tower inside the weights is the one loaded (the cached CLIP only gives its config); yes/no runs."""
    from PIL import Image
    from safetensors.torch import load_file

    from muffin.family import Sample
    from muffin.inference import yes_no_probs

    pytest.importorskip("sentencepiece")
    path = build_tiny_rlaifv_7b(ckpt("liuhaotian"), tmp_path / "rlaifv-7b-tiny", clip_cache)
    fam = load_family(path, device="cpu")
    stored = {}
    for shard in path.glob("*.safetensors"):
        stored.update(load_file(str(shard)))
    name = "model.vision_tower.vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight"
    loaded = dict(fam.model.named_parameters())
    got = next(v for k, v in loaded.items() if k.endswith("encoder.layers.23.mlp.fc1.weight"))
    assert torch.equal(got.detach(), stored[name].float())
    cached = load_file(str(clip_cache / "model.safetensors"))["vision_model.encoder.layers.23.mlp.fc1.weight"]
    assert not torch.equal(got.detach(), cached)
    ((p_yes, p_no),) = yes_no_probs(fam, [Sample(Image.new("RGB", (30, 20), (9, 99, 199)), "Is there a cat?")])
    assert 0 < p_yes + p_no <= 1 + 1e-6


def _run_everything(path: Path, tmp_path: Path) -> None:
    """Chat, seeded sampling, yes/no scoring and two DPO steps through the public entry points."""
    from PIL import Image
    from test_train_data import write_rlaifv_parquet

    from chat import RLAIFVChat
    from muffin.decoding import CANDIDATE_SAMPLING, GREEDY
    from muffin.family import Sample
    from muffin.inference import generate, yes_no_probs, yes_no_token_ids
    from muffin.train.args import DPOConfig
    from muffin.train.train_dpo import build_trainer

    image = Image.new("RGB", (40, 30), (200, 40, 40))
    bot = RLAIFVChat(path, device="cpu", decoding=GREEDY.replace(max_new_tokens=6))
    assert isinstance(bot.chat({"image": image, "question": "What is in the image?"}), str)
    fam = bot.family
    yes, no = yes_no_token_ids(fam)
    assert sorted(fam.tokenizer.convert_ids_to_tokens(yes + no)) == ["▁No", "▁Yes", "▁no", "▁yes"]
    samples = [Sample(image, "Describe the image."), Sample(image, "Is there a dog?")]
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=5)
    assert generate(fam, samples, dec, seeds=[3, 4]) == generate(fam, samples, dec, seeds=[3, 4])
    probs = yes_no_probs(fam, samples)
    assert all(0 < p_yes and 0 < p_no and p_yes + p_no <= 1 + 1e-6 for p_yes, p_no in probs)
    data = write_rlaifv_parquet(tmp_path / "pairs", n=2)
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        model_path=str(path),
        data=str(data),
        logps_dir=str(tmp_path / "logps"),
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
    trainer = build_trainer(args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # log 2: policy == reference
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n].detach()) for n in before)


def test_tiny_liuhaotian_chats_generates_scores_and_trains(tiny_liuhaotian, tmp_path) -> None:
    _run_everything(tiny_liuhaotian, tmp_path)


def test_tiny_llava_hf_carries_the_published_layout_and_runs(ckpt, tiny_llava_hf, tmp_path) -> None:
    from safetensors import safe_open

    names = set()
    for shard in tiny_llava_hf.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as h:
            names |= set(h.keys())
    assert names == set(_weight_map(ckpt("llava_hf")))
    assert _config(tiny_llava_hf)["architectures"] == ["LlavaForConditionalGeneration"]
    _run_everything(tiny_llava_hf, tmp_path)
