"""OmniLMM's vision side: the timm EVA02 tower (penultimate-block features) and the image transform.

The tower is built as the original does: ``timm.create_model(name, pretrained=False, num_classes=0,
dynamic_img_size=True, dynamic_img_pad=True)``, its attention pool (if any) and its LAST block replaced by identity,
and the prefix (CLS) tokens dropped from ``forward_features``. Weights come from the OmniLMM checkpoint
(``model.vision_tower.*``), never from timm's hub.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from PIL import Image
from torch import nn

# OpenAI CLIP normalisation (the original's build_transform(std_mode='OPENAI_CLIP')).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BlockIdentity(nn.Identity):
    """Identity that accepts the keyword arguments timm passes to a block (``rope=``, ``attn_mask=``, ...)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


def _import_timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise ImportError(
            "OmniLMM's vision tower is a timm EVA02 model, but timm is not installed. "
            "Install it with `pip install 'timm>=1.0'`."
        ) from e


def build_vision_tower(name: str, vision_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The timm tower with its last block (and attention pool) replaced by identity.

    Args:
        name: timm architecture (published: ``eva02_enormous_patch14_clip_224``).
        vision_kwargs: extra ``create_model`` kwargs; empty for the published sizes.
    """
    timm = _import_timm()
    try:
        tower = timm.create_model(
            name, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True, **(vision_kwargs or {})
        )
    except RuntimeError as e:  # timm's "Unknown model (...)"
        raise ValueError(
            f"config field 'vision_model_name'={name!r} is not a timm architecture ({e}); "
            "OmniLMM 12B uses 'eva02_enormous_patch14_clip_224'"
        ) from e
    if getattr(tower, "attn_pool", None) is not None:
        tower.attn_pool = BlockIdentity()
    # penultimate-block features, as the original ("use 2nd last layer's output")
    tower.blocks[-1] = BlockIdentity()
    return tower


def vision_features(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) images -> (N, L, C) patch features with the prefix (CLS) tokens dropped."""
    dtype = tower.patch_embed.proj.weight.dtype
    feats = tower.forward_features(pixel_values.to(dtype))  # (N, prefix + L, C)
    return feats[:, getattr(tower, "num_prefix_tokens", 0) :]


def vision_width(tower: nn.Module) -> int:
    """Channel width C of the tower's features."""
    return int(getattr(tower, "embed_dim", None) or tower.num_features)


class OmniLMMImageTransform:
    """Resize to ``size`` x ``size`` (bicubic, aspect ratio not kept), then CLIP-normalise: (3, size, size) float."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # torchvision's Resize((s, s), BICUBIC) on a PIL image is PIL's bicubic resize; we call PIL directly.
        img = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float().div(255.0)  # (3, S, S), ToTensor
        return (x - self.mean) / self.std

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, 3, size, size)."""
        return torch.stack([self(im) for im in images])
