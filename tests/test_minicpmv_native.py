"""Native MiniCPM-Llama3-V 2.5 against the published files: weight index, config, preprocessing, resampler.

Published files (../shared/reference/checkpoints/openbmb--MiniCPM-Llama3-V-2_5, hub revision 45208262) are read
through the ``reference_dir`` fixture; those tests skip without it. Full-size models are built on the meta device.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnilmm.minicpmv_model import MiniCPMVConfig, MiniCPMVResampler, build_empty, sincos_2d
from omnilmm.minicpmv_processing import MiniCPMVImageSlicer, _divisible

PUB = "checkpoints/openbmb--MiniCPM-Llama3-V-2_5"


@pytest.fixture(scope="module")
def published(reference_dir: Path) -> Path:
    return reference_dir / PUB


@pytest.fixture(scope="module")
def meta_model(published: Path):
    return build_empty(MiniCPMVConfig.from_pretrained(published))


def test_published_index_maps_one_to_one(published: Path, meta_model) -> None:
    """Every key of the published index is a parameter of the model built from the published config, and back."""
    index = json.loads((published / "model.safetensors.index.json").read_text())
    ours = meta_model.state_dict()
    assert set(ours) == set(index["weight_map"])
    assert len(ours) == 741  # SOURCES.md: llm.* 291, vpm.* 437, resampler.* 13
    prefixes = [k.split(".")[0] for k in ours]
    assert (prefixes.count("llm"), prefixes.count("vpm"), prefixes.count("resampler")) == (291, 437, 13)


def test_every_shape_follows_the_published_config(published: Path, meta_model) -> None:
    """Every one of the 741 shapes, derived by hand from config.json: Llama-3-8B (H 4096, 32 heads of 128, 8 KV heads,
    MLP 14336, vocab 128256), the SigLIP-so400m tower (C 1152, MLP 4304, patch 14, 980/14 = 70 -> 4900 positions),
    the resampler (96 queries of 4096 over 1152-wide keys). The index's total_size is 4 bytes per parameter (the
    fp16 shards hold half that)."""
    cfg = json.loads((published / "config.json").read_text())
    h, m, v, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_key_value_heads"] * 128
    vc = cfg["vision_config"]
    c, cm, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    shapes = {
        "llm.model.embed_tokens.weight": (v, h),
        "llm.lm_head.weight": (v, h),
        "llm.model.norm.weight": (h,),
        "llm.model.layers.N.input_layernorm.weight": (h,),
        "llm.model.layers.N.post_attention_layernorm.weight": (h,),
        "llm.model.layers.N.self_attn.q_proj.weight": (h, h),
        "llm.model.layers.N.self_attn.k_proj.weight": (kv, h),
        "llm.model.layers.N.self_attn.v_proj.weight": (kv, h),
        "llm.model.layers.N.self_attn.o_proj.weight": (h, h),
        "llm.model.layers.N.mlp.gate_proj.weight": (m, h),
        "llm.model.layers.N.mlp.up_proj.weight": (m, h),
        "llm.model.layers.N.mlp.down_proj.weight": (h, m),
        "vpm.embeddings.patch_embedding.weight": (c, 3, p, p),
        "vpm.embeddings.patch_embedding.bias": (c,),
        "vpm.embeddings.position_embedding.weight": ((vc["image_size"] // p) ** 2, c),
        "vpm.post_layernorm.weight": (c,),
        "vpm.post_layernorm.bias": (c,),
        **{f"vpm.encoder.layers.N.layer_norm{i}.{w}": (c,) for i in (1, 2) for w in ("weight", "bias")},
        **{f"vpm.encoder.layers.N.self_attn.{x}_proj.weight": (c, c) for x in ("q", "k", "v", "out")},
        **{f"vpm.encoder.layers.N.self_attn.{x}_proj.bias": (c,) for x in ("q", "k", "v", "out")},
        "vpm.encoder.layers.N.mlp.fc1.weight": (cm, c),
        "vpm.encoder.layers.N.mlp.fc1.bias": (cm,),
        "vpm.encoder.layers.N.mlp.fc2.weight": (c, cm),
        "vpm.encoder.layers.N.mlp.fc2.bias": (c,),
        "resampler.query": (cfg["query_num"], h),
        "resampler.proj": (h, h),
        "resampler.kv_proj.weight": (h, c),
        "resampler.attn.in_proj_weight": (3 * h, h),
        "resampler.attn.in_proj_bias": (3 * h,),
        "resampler.attn.out_proj.weight": (h, h),
        "resampler.attn.out_proj.bias": (h,),
        **{f"resampler.ln_{x}.{w}": (h,) for x in ("q", "kv", "post") for w in ("weight", "bias")},
    }
    sd = meta_model.state_dict()
    got = {k: tuple(t.shape) for k, t in sd.items()}
    assert got == {k: shapes[re.sub(r"\.\d+\.", ".N.", k)] for k in got}
    assert (h, m, v, kv, c, cm, p) == (4096, 14336, 128256, 1024, 1152, 4304, 14)
    total = json.loads((published / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert sum(t.numel() for t in sd.values()) * 4 == total
    assert meta_model.resampler.attn.num_heads == 4096 // 128
    assert all(t.device.type == "meta" for t in meta_model.parameters())


def test_config_refuses_missing_sizes(published: Path) -> None:
    raw = json.loads((published / "config.json").read_text())
    for key in ("hidden_size", "query_num", "vision_config"):
        bad = {k: v for k, v in raw.items() if k != key}
        with pytest.raises(ValueError, match=key):
            MiniCPMVConfig.from_dict(bad)
    bad = {**raw, "vision_config": {k: v for k, v in raw["vision_config"].items() if k != "num_hidden_layers"}}
    with pytest.raises(ValueError, match="num_hidden_layers"):
        MiniCPMVConfig.from_dict(bad)
    cfg = MiniCPMVConfig.from_dict(raw)
    assert (cfg.text.rope_parameters["rope_theta"], cfg.text.num_key_value_heads) == (500000.0, 8)
    assert (cfg.vision.hidden_act, cfg.vision.layer_norm_eps) == ("gelu_pytorch_tanh", 1e-6)  # Idefics2 defaults


def test_tiny_format_constants_equal_published(published: Path) -> None:
    """The tiny builder's defaults are the published files' values (so the default fixture is the published format)."""
    from omnilmm import minicpmv_tiny as t

    assert t.FORMAT_CONFIG == json.loads((published / "config.json").read_text())
    assert t.FORMAT_PREPROCESSOR == json.loads((published / "preprocessor_config.json").read_text())
    tok_cfg = json.loads((published / "tokenizer_config.json").read_text())
    assert t.CHAT_TEMPLATE == tok_cfg["chat_template"]
    added = tok_cfg["added_tokens_decoder"]
    assert t.SPECIAL_TOKENS == [added[str(i)]["content"] for i in range(128000, 128022)]


# ---------------------------------------------------------------------------------------------------- slicing
SLICER = MiniCPMVImageSlicer(9, 448, 14, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_rounding_is_half_to_even() -> None:
    """The original's ensure_divide uses Python's round: 35/14 = 2.5 -> 2 (28), 49/14 = 3.5 -> 4 (56)."""
    assert (_divisible(35, 14), _divisible(49, 14), _divisible(3, 14)) == (28, 56, 14)


def test_small_image_is_upscaled_whole() -> None:
    """100x100: 1e4 px < 448^2, so one slice, upscaled to 448x448 (32x32 patches)."""
    assert SLICER.grid((100, 100)) is None
    (s,) = SLICER.slices(Image.new("RGB", (100, 100)))
    assert s.size == (448, 448)


def test_wide_image_grid_and_sizes() -> None:
    """1000x500 by hand: 5e5/448^2 = 2.49 -> 3 slices wanted; grids of 2, 3, 4 slices are candidates and (2, 1)
    matches log(2) exactly. Source: r = 2, h = int(448/sqrt 2) = 316, w = 632 -> multiples of 14 by round:
    630 x 322. Cells: (1000/2, 500/1) = 500x500 -> upscaled to 448x448; refined image 896x448."""
    assert SLICER.grid((1000, 500)) == (2, 1)
    sizes = [s.size for s in SLICER.slices(Image.new("RGB", (1000, 500)))]
    assert sizes == [(630, 322), (448, 448), (448, 448)]


def test_grid_choice_by_hand() -> None:
    """600x1200: 7.2e5/448^2 = 3.59 -> 4 slices wanted; candidates 1x3, 3x1, 1x4, 2x2, 4x1, 1x5, 5x1 against
    log(1/2): errors .41, 1.79, .69, .69, 2.08, .92, 2.30 -> 1x3. 1050x1050: 5.49 -> 6; 2x3 and 3x2 tie on paper,
    but 2/3 rounds below its value, so |log(2/3)| exceeds log(3/2) by an ulp and 3x2 wins under the original's
    strict '<' with its own float operations (log of the quotient)."""
    assert SLICER.grid((600, 1200)) == (1, 3)
    assert abs(math.log(2 / 3)) > math.log(3 / 2)
    assert SLICER.grid((1050, 1050)) == (3, 2)


def test_patch_strip_layout() -> None:
    """A 28x42 slice (2x3 patches of 14): pixel (y, x) lands at strip[:, y % 14, k*14 + x % 14] with patch index
    k = (y // 14) * 3 + x // 14 (row-major), normalised as (v/255 - 0.5)/0.5."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (28, 42, 3), dtype=np.uint8)
    strip, hw = SLICER.to_patches(Image.fromarray(arr))
    assert hw == (2, 3) and strip.shape == (3, 14, 6 * 14)
    for y, x in [(0, 0), (13, 20), (14, 0), (27, 41), (20, 30)]:
        k = (y // 14) * 3 + x // 14
        want = (arr[y, x].astype(np.float32) / 255 - 0.5) / 0.5
        assert np.allclose(strip[:, y % 14, k * 14 + x % 14].numpy(), want)


# ---------------------------------------------------------------------------------------------------- resampler
def test_sincos_table_by_hand() -> None:
    """dim 8: each half is 4 channels [sin(p), sin(p/100), cos(p), cos(p/100)] (w_k = 1e4^(-k/2)); first half
    encodes the column, second the row. At (row 1, col 2)."""
    t = sincos_2d(8, 3, 4)
    col, row = [2.0, 0.02], [1.0, 0.01]
    want = [math.sin(col[0]), math.sin(col[1]), math.cos(col[0]), math.cos(col[1])]
    want += [math.sin(row[0]), math.sin(row[1]), math.cos(row[0]), math.cos(row[1])]
    assert t.shape == (3, 4, 8) and torch.allclose(t[1, 2], torch.tensor(want), atol=1e-6)


def test_resampler_one_head_by_hand() -> None:
    """One head, written out: q = LN_q(query) W_q, k = (LN_kv(x W_kv) + pos) W_k, v = LN_kv(x W_kv) W_v,
    out = LN_post(softmax(q k^T / sqrt d) v W_o) proj; padded patches (past h*w) get no weight."""
    torch.manual_seed(0)
    r = MiniCPMVResampler(num_queries=3, embed_dim=8, num_heads=1, kv_dim=6).eval()
    x = torch.randn(2, 6, 6)
    sizes = torch.tensor([[2, 3], [1, 2]])
    out = r(x, sizes)
    w_q, w_k, w_v = r.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = r.attn.in_proj_bias.chunk(3)
    table = sincos_2d(8, 2, 3)
    for i, (h, w) in enumerate(sizes.tolist()):
        kv = r.ln_kv(x[i, : h * w] @ r.kv_proj.weight.T)
        k = (kv + table[:h, :w].reshape(h * w, 8)) @ w_k.T + b_k
        v = kv @ w_v.T + b_v
        q = r.ln_q(r.query) @ w_q.T + b_q
        att = torch.softmax(q @ k.T / math.sqrt(8), -1) @ v
        want = r.ln_post(att @ r.attn.out_proj.weight.T + r.attn.out_proj.bias) @ r.proj
        assert torch.allclose(out[i], want, atol=1e-5)


def test_tower_pads_like_the_published_code() -> None:
    """Slices of one sample go through the tower together as the published code sends them: a slice padded to the
    longest slice's patch count with zero pixels and NOT masked (its all-True patch mask). So a 2x3 slice batched
    with a 3x2 one (same count) equals it alone; batched with a 3x3 one it equals itself zero-padded to 9 patches
    alone (pads attended, positions bucketed over 9), and differs from itself unpadded. The per-slice path
    (batch_vision_input false) runs each slice unpadded."""
    from omnilmm.minicpmv_model import MiniCPMV
    from omnilmm.minicpmv_tiny import FORMAT_CONFIG, shrink

    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, **{str(i): i for i in range(2, 64)}}
    cfg, _ = shrink(FORMAT_CONFIG, {}, vocab)
    torch.manual_seed(0)
    model = MiniCPMV(MiniCPMVConfig.from_dict(cfg)).eval()
    rng = np.random.default_rng(1)
    a, b, c = (
        SLICER.to_patches(Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)))
        for s in [(28, 42, 3), (42, 28, 3), (42, 42, 3)]
    )
    size = lambda *xs: torch.tensor([x[1] for x in xs])  # noqa: E731
    padded = torch.cat([a[0], torch.zeros(3, 14, 3 * 14)], dim=2)  # 6 -> 9 patches of zeros
    with torch.no_grad():
        alone = model.encode_slices([a[0]], size(a))
        same_count = model.encode_slices([a[0], b[0]], size(a, b))
        with_bigger = model.encode_slices([a[0], c[0]], size(a, c))
        padded_alone = model.encode_slices([padded], size(a))
        model.config.batch_vision_input = False
        per_slice = model.encode_slices([a[0], c[0]], size(a, c))
    assert same_count.shape == (2, cfg["query_num"], cfg["hidden_size"])
    assert torch.allclose(same_count[0], alone[0], atol=1e-5)
    assert torch.allclose(with_bigger[0], padded_alone[0], atol=1e-5)
    assert not torch.allclose(with_bigger[0], alone[0], atol=1e-3)
    assert torch.allclose(per_slice[0], alone[0], atol=1e-5)
