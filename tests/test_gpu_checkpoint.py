"""The random-weight checkpoints of the full-size run (``script.gpu.make_checkpoint``): the tiny OmniLMM shape saved,
loaded by ``muffin.load_family``, generating text and labelling by question; the full shapes equal the published
configs (meta device only: nothing full-size is built here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from muffin import Sample, load_family
from muffin.decoding import Decoding
from muffin.inference import generate, yes_no_probs
from script.gpu import make_checkpoint as mc

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [f"Is it true that {' '.join(np.random.default_rng(i).choice(mc.WORDS, 6 + i % 7))}?" for i in range(16)]


def _image(seed: int, size: int = 336) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _verdicts(fam, image: Image.Image) -> list[bool]:
    """The labeler's verdict per question about ``image``: P(yes) > P(no)."""
    return [y > n for y, n in yes_no_probs(fam, [Sample(image, q) for q in QUESTIONS], batch_size=16)]


@pytest.fixture(scope="module")
def omni_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mc.build("omni-tiny", tmp_path_factory.mktemp("omni-tiny") / "ckpt", seed=0)


def test_omni_tiny_saves_in_the_published_layout_and_loads_as_omnilmm(omni_tiny: Path) -> None:
    """The directory holds what a released OmniLMM checkpoint holds (config, weights, tokenizer) and nothing of our
    own; ``load_family`` detects the family from config.json and loads it. Suppressed rows, by hand: the three
    image-marker ids and every row from the tokenizer's length to the 32009 rows of the published vocabulary."""
    config = json.loads((omni_tiny / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("omnilmm", ["OmniLMMForCausalLM"])
    assert config["vocab_size"] == 32009 and (config["num_query"], config["image_size"]) == (4, 56)
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in omni_tiny.iterdir()}
    fam = load_family(omni_tiny, device="cpu")
    assert type(fam).__name__ == "OmniLMMFamily"
    tok = fam.tokenizer
    markers = tok.convert_tokens_to_ids(["<im_start>", "<im_end>", "<im_patch>"])
    assert len(tok) < 32009 and max(markers) < len(tok)
    assert fam.model.generation_config.suppress_tokens == sorted(markers) + list(range(len(tok), 32009))
    # Mistral's tokenizer starts every text with <s> (id 1), the Zephyr template writes none
    assert tok("Is there a dog?")["input_ids"][0] == 1 == config["bos_token_id"]
    assert config["pad_token_id"] == config["eos_token_id"] == 2 == tok.pad_token_id


def test_omni_tiny_generation_decodes_to_text(omni_tiny: Path) -> None:
    """Sampled answers hold only ids the tokenizer has (the suppressed rows are never drawn) and decode to words."""
    fam = load_family(omni_tiny, device="cpu")
    torch.manual_seed(0)
    samples = [Sample(_image(1), "Describe the image in detail."), Sample(_image(2), "What is in the picture?")]
    ids = fam.generate_ids(fam.encode(samples, for_generation=True), max_new_tokens=48, do_sample=True)
    never = set(fam.model.generation_config.suppress_tokens)
    assert ids.numel() and not never & set(ids.flatten().tolist()) - {fam.pad_id}
    answers = generate(fam, samples, Decoding(max_new_tokens=48, do_sample=True, temperature=0.7))
    assert len(answers) == 2 and all(len(a) > 0 for a in answers)
    assert all("<im_patch>" not in a and "\ufffd" not in a for a in answers)


def test_spread_yes_no_makes_the_verdicts_follow_the_question(omni_tiny: Path) -> None:
    """Before the spread, a random model gives one verdict to all 16 questions about an image (its read-out state is
    nearly the same for all of them); after it, the saved checkpoint answers some yes and some no about an image it
    was not calibrated on."""
    torch.manual_seed(0)
    raw = mc.random_family("omni-tiny", seed=0)
    assert len(set(_verdicts(raw, _image(7)))) == 1
    fam = load_family(omni_tiny, device="cpu")
    for seed in (7, 8):
        verdicts = _verdicts(fam, _image(seed))
        assert 2 <= sum(verdicts) <= len(verdicts) - 2, verdicts


def test_an_existing_checkpoint_of_another_family_is_refused(omni_tiny: Path) -> None:
    """The driver reuses --out when it holds a checkpoint: a LLaVA shape must not silently run on an OmniLMM one."""
    cmd = [sys.executable, "-m", "script.gpu.make_checkpoint", "--shape", "tiny", "--out", str(omni_tiny)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "holds a 'omnilmm' checkpoint" in res.stderr
    with pytest.raises(ValueError, match="unknown shape 'omni7b'. Available: 7b, tiny, omni12b, omni-tiny"):
        mc.model_config("omni7b", None)


@pytest.mark.parametrize("name", ["openbmb--OmniLMM-12B", "openbmb--RLAIF-V-12B"])
def test_omni12b_sizes_equal_the_published_config(reference_dir: Path, name: str) -> None:
    """Every size of ``OMNILMM_12B`` is the published config.json's value; the tower is the architecture part of
    ``mm_vision_tower`` (``<timm architecture>.<pretrained tag>``)."""
    published = json.loads((reference_dir / "checkpoints" / name / "reconstructed" / "config.json").read_text())
    ours = dict(mc.OMNILMM_12B)
    assert ours.pop("vision_model_name") == published["mm_vision_tower"].split(".")[0]
    assert {k: published.get(k, "MISSING") for k in ours} == ours


def test_omni12b_builds_the_published_layout_on_meta(reference_dir: Path) -> None:
    """On the meta device, the omni12b config (with our tokenizer's ids) and the published config.json build models
    with the same tensor names and shapes. Counts by hand: the Mistral body is 2 x 32009 x 4096 (embeddings, lm_head)
    + 32 x (2 x 4096^2 (q, o) + 2 x 4096 x 1024 (k, v, 8 KV heads of 128) + 3 x 4096 x 14336 + 2 x 4096) + 4096 =
    7,241,805,824; the resampler 256 x 4096 x 2 (queries, sin-cos table) + 1792 x 4096 (kv_proj) + 3 x 4096^2 + 3 x 4096
    (in-proj) + 4096^2 + 4096 (out-proj) + 3 x 2 x 4096 (norms) + 4096^2 (proj) = 93,364,224. The whole model is the
    hub's five bf16 shards of RLAIF-V-12B, 23.23 GB, within their 10 MB rounding."""
    from omnilmm.config import OmniLMMConfig
    from omnilmm.modeling import OmniLMMForCausalLM

    cfg = mc.model_config("omni12b", mc.offline_tokenizer("omnilmm"))
    published = OmniLMMConfig.from_pretrained(reference_dir / "checkpoints" / "openbmb--OmniLMM-12B" / "reconstructed")
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in OmniLMMForCausalLM(cfg).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in OmniLMMForCausalLM(published).state_dict().items()}
    assert ours == theirs

    def count(prefixes: tuple[str, ...]) -> int:
        return sum(int(np.prod(s)) for k, s in ours.items() if k.startswith(prefixes))

    assert count(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")) == 7_241_805_824
    assert count(("model.resampler.",)) == 93_364_224
    assert abs(2 * count(("",)) / 1e9 - (4.94 + 5 + 4.96 + 4.97 + 3.36)) <= 5 * 0.005


def test_7b_shape_equals_the_published_llava_config(reference_dir: Path) -> None:
    """The 7b shape's architecture fields equal llava-hf/llava-1.5-7b-hf's config.json as transformers reads it
    (fields the file leaves out take the config classes' defaults there as here). Token ids are not architecture:
    ours come from the offline tokenizer."""
    from transformers import LlavaConfig

    ours = mc.model_config("7b", mc.offline_tokenizer("llava"))
    published = LlavaConfig.from_pretrained(reference_dir / "checkpoints" / "llava-hf--llava-1.5-7b-hf")
    text = (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
        "head_dim max_position_embeddings rms_norm_eps hidden_act rope_parameters tie_word_embeddings "
        "attention_bias mlp_bias"
    ).split()
    vision = (
        "hidden_size intermediate_size num_hidden_layers num_attention_heads image_size patch_size num_channels "
        "projection_dim hidden_act layer_norm_eps"
    ).split()
    top = "projector_hidden_act vision_feature_layer vision_feature_select_strategy multimodal_projector_bias".split()
    for fields, a, b in (
        (text, ours.text_config, published.text_config),
        (vision, ours.vision_config, published.vision_config),
        (top, ours, published),
    ):
        assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}
    assert published.text_config.hidden_size == 4096 and published.vision_config.image_size == 336


def test_built_in_the_target_dtype_as_from_pretrained_loads_it(tmp_path: Path) -> None:
    """The GPU build runs in bf16 (here on the CPU): every parameter bf16, and the buffers from_pretrained keeps in
    float32 (the rotary inv_freq, the resampler's sin-cos table) float32 as after loading, so the yes/no spread is
    calibrated on the states the loaded checkpoint computes."""
    fam = mc.random_family("omni-tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in fam.model.parameters()} == {torch.bfloat16}
    fam.save_pretrained(tmp_path)
    loaded = load_family(tmp_path, device="cpu", dtype="bf16")

    def dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
        return {n: b.dtype for n, b in model.named_buffers() if b.dtype != torch.bfloat16}

    assert dtypes(fam.model) == dtypes(loaded.model)
    assert dtypes(fam.model)["model.rotary_emb.inv_freq"] == torch.float32


def test_omni12b_gpu_build_path_runs_on_meta() -> None:
    """``random_family`` at full size, as the GPU run calls it (built directly on the device in bf16), here on the meta
    device: every parameter and buffer lands on the device (the resampler's table too), the family accepts the model
    and the saved generation config will suppress the 3 markers and the 32009 - len(tokenizer) rows past the vocabulary.
    """
    fam = mc.random_family("omni12b", device="meta", dtype=torch.bfloat16)
    model = fam.model
    assert type(fam).__name__ == "OmniLMMFamily"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert len(model.generation_config.suppress_tokens) == 3 + 32009 - len(fam.tokenizer)
