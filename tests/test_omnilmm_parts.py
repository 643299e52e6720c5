"""OmniLMM building blocks checked against independent computations: sin-cos table, bicubic resize, resampler,
vision tower recipe, config validation, image transform."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omnilmm.config import OmniLMMConfig
from omnilmm.resampler import Resampler, resize_pos_embed, sincos_2d
from omnilmm.tiny import TINY_VISION
from omnilmm.vision import CLIP_MEAN, CLIP_STD, BlockIdentity, OmniLMMImageTransform, build_vision_tower


def test_sincos_2d_by_hand() -> None:
    """dim 4, grid 2: the 1-D table of dim 2 has one frequency (w = 1), so row-major cell (i, j) is
    [sin j, cos j, sin i, cos i] (first half encodes the column, as MAE's meshgrid(w, h) does)."""
    got = sincos_2d(4, 2)
    want = torch.tensor([[math.sin(j), math.cos(j), math.sin(i), math.cos(i)] for i in range(2) for j in range(2)])
    torch.testing.assert_close(got, want.float())


def test_sincos_2d_second_frequency() -> None:
    """dim 8: 1-D dim 4 has frequencies 1 and 1e4^(-1/2) = 0.01; cell (1, 2) column part = [sin 2, sin .02, cos 2, cos .02]."""
    got = sincos_2d(8, 3)[1 * 3 + 2]
    want = [
        math.sin(2),
        math.sin(0.02),
        math.cos(2),
        math.cos(0.02),
        math.sin(1),
        math.sin(0.01),
        math.cos(1),
        math.cos(0.01),
    ]
    torch.testing.assert_close(got, torch.tensor(want).float())


def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """1-D bicubic resampling matrix (Keys kernel, a=-0.75, half-pixel centres, edge clamp) written from scratch."""

    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(src)
        for tap in range(x0 - 1, x0 + 3):
            m[i, min(max(tap, 0), n_in - 1)] += k(src - tap)
    return m


def test_resize_pos_embed_matches_independent_bicubic() -> None:
    """2x2 query grid -> 4x4 patch grid: separable Keys-cubic resampling per channel, M @ G @ M^T."""
    torch.manual_seed(0)
    pos = torch.randn(4, 6)
    got = resize_pos_embed(pos, 16).reshape(4, 4, 6)
    m = _cubic_matrix(2, 4)
    for c in range(6):
        want = m @ pos[:, c].reshape(2, 2).double().numpy() @ m.T
        np.testing.assert_allclose(got[..., c].double().numpy(), want, atol=1e-5)


def test_resize_pos_embed_identity_and_non_square() -> None:
    pos = torch.randn(9, 4)
    assert resize_pos_embed(pos, 9) is pos
    with pytest.raises(ValueError, match="square patch grid"):
        resize_pos_embed(pos, 10)


def test_resampler_matches_manual_attention() -> None:
    """Recompute the resampler by hand: q = LN_q(query) + pos, k = LN_kv(W x) + resized pos, v = LN_kv(W x),
    2-head softmax(QK^T/sqrt(d))V, out-proj, LN_post, @ proj. 4 queries over a 3x3 patch grid."""
    torch.manual_seed(1)
    r = Resampler(grid_size=2, embed_dim=8, num_heads=2, kv_dim=5).eval()
    x = torch.randn(2, 9, 5)
    got = r(x)
    assert got.shape == (2, 4, 8)

    def ln(t: torch.Tensor, m: torch.nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(t, (8,), m.weight, m.bias, 1e-6)

    kv = ln(x @ r.kv_proj.weight.T, r.ln_kv)  # (N, 9, 8)
    key_pos = resize_pos_embed(r.pos_embed, 9)
    q = ln(r.query, r.ln_q) + r.pos_embed  # (4, 8)
    wq, wk, wv = r.attn.in_proj_weight.chunk(3)
    bq, bk, bv = r.attn.in_proj_bias.chunk(3)
    qh = (q @ wq.T + bq).view(4, 2, 4).transpose(0, 1)  # (h, 4, d)
    out = []
    for n in range(2):
        kh = ((kv[n] + key_pos) @ wk.T + bk).view(9, 2, 4).transpose(0, 1)
        vh = (kv[n] @ wv.T + bv).view(9, 2, 4).transpose(0, 1)
        att = torch.softmax(qh @ kh.transpose(1, 2) / 2.0, dim=-1)  # sqrt(d) = 2
        o = (att @ vh).transpose(0, 1).reshape(4, 8) @ r.attn.out_proj.weight.T + r.attn.out_proj.bias
        out.append(ln(o, r.ln_post) @ r.proj)
    torch.testing.assert_close(got, torch.stack(out), atol=1e-5, rtol=1e-5)


def test_resampler_layout_and_fixed_pos_embed() -> None:
    r = Resampler(grid_size=3, embed_dim=16, num_heads=2, kv_dim=16)
    assert isinstance(r.kv_proj, torch.nn.Identity)  # equal widths: no projection, as the original
    assert "pos_embed" in r.state_dict() and "pos_embed" not in dict(r.named_parameters())
    assert r.attn.num_heads == 2 and r.ln_q.eps == 1e-6 and r.proj.shape == (16, 16)


def test_vision_tower_recipe() -> None:
    """Last block replaced by identity, CLS dropped: 56 px / patch 14 -> 16 patch tokens of width 64."""
    from omnilmm.vision import vision_features

    tower = build_vision_tower("eva02_enormous_patch14_clip_224", TINY_VISION)
    assert len(tower.blocks) == TINY_VISION["depth"] and isinstance(tower.blocks[-1], BlockIdentity)
    assert not isinstance(tower.blocks[0], BlockIdentity)
    assert not any(k.startswith(f"blocks.{TINY_VISION['depth'] - 1}.") for k in tower.state_dict())
    assert vision_features(tower, torch.randn(2, 3, 56, 56)).shape == (2, 16, 64)


def test_missing_timm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install 'timm"):
        build_vision_tower("eva02_enormous_patch14_clip_224", TINY_VISION)


def test_unknown_timm_architecture() -> None:
    with pytest.raises(ValueError, match="vision_model_name"):
        build_vision_tower("no_such_vit_xyz", {})


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"image_size": 448}, "num_query"),
        ({"num_query": 10, "image_size": 448}, "num_query"),
        ({"num_query": 64}, "image_size"),
        ({"num_query": 64, "image_size": 0}, "image_size"),
        ({"num_query": 64, "image_size": 448, "hidden_size": 256, "resampler_num_heads": 3}, "resampler_num_heads"),
    ],
)
def test_config_validation_names_the_field(kw: dict, field: str) -> None:
    cfg = OmniLMMConfig(**kw)  # constructing never raises (transformers builds default configs internally)
    with pytest.raises(ValueError, match=field):
        cfg.validate_multimodal()


def test_published_defaults() -> None:
    """hidden 4096 (Zephyr-7B) -> 32 resampler heads; 64 queries -> an 8x8 grid."""
    cfg = OmniLMMConfig(num_query=64, image_size=448)
    cfg.validate_multimodal()
    assert (cfg.resampler_heads, cfg.query_grid, cfg.model_type) == (32, 8, "omnilmm")
    assert cfg.vision_model_name == "eva02_enormous_patch14_clip_224" and cfg.vision_kwargs == {}


def test_image_transform_by_hand() -> None:
    """A uniform (255, 0, 51) image stays uniform under bicubic resize; each channel is (v/255 - mean) / std."""
    t = OmniLMMImageTransform(14)
    x = t(Image.new("RGB", (30, 10), (255, 0, 51)))
    assert x.shape == (3, 14, 14)
    for c, v in enumerate((255, 0, 51)):
        torch.testing.assert_close(x[c], torch.full((14, 14), (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]))
