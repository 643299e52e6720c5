"""LLaVA 1.5 ``image_aspect_ratio=pad`` preprocessing: pad to a square with the CLIP mean colour, then CLIP.

The original pads with ``tuple(int(x * 255) for x in image_mean)`` = (122, 116, 104), centring the image
(``expand2square``), then applies the CLIP image processor (bicubic resize of the short side, centre crop,
rescale, normalise). We use it everywhere: training, reference log-probs, generation, labelling and evaluation
(the original trained on centre crops of unpadded images but generated on padded ones; we do not).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import CLIPImageProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104)


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Centre ``img`` on a square canvas of side max(w, h) filled with ``fill`` (LLaVA's expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def make_image_processor(size: int) -> CLIPImageProcessor:
    """The CLIP processor of ``openai/clip-vit-large-patch14-336`` at ``size`` (336 for LLaVA 1.5)."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=Image.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def preprocess(images: list[Image.Image], processor: CLIPImageProcessor) -> torch.Tensor:
    """(N, 3, S, S) float32 pixel values of padded images."""
    padded = [expand_to_square(im.convert("RGB")) for im in images]
    return processor(images=padded, return_tensors="pt")["pixel_values"]
