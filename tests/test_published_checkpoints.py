"""Every family against the PUBLISHED checkpoint files in ../shared/reference/checkpoints (issue 25).

Detection reads model_type and architectures; each published config builds (on the meta device, no memory) the
model its family loads, whose parameters map one to one onto the published weight names; the published tokenizers
load; tiny checkpoints made at run time from the published files load and run chat, generation, yes/no and DPO.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
