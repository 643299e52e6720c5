"""MiniCPM-Llama3-V 2.5's image slicing, placeholders and tokenisation, read from ``preprocessor_config.json``.

Behaves as the checkpoint's ``MiniCPMVImageProcessor`` + ``MiniCPMVProcessor`` (hub revision 45208262): the image
is resized to about ``scale_resolution``^2 pixels (the source slice) and, when larger, also cut into a grid of up
to ``max_slice_nums`` slices; each slice becomes ``<image>`` + ``image_feature_size`` x ``<unk>`` + ``</image>``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_TAG = "(<image>./</image>)"  # where the prompt puts an image, as the original chat() writes it


def _divisible(length: float, patch: int) -> int:
    # Python's round (half to even), as the original's ensure_divide
    return max(round(length / patch) * patch, patch)


@dataclass(frozen=True)
class MiniCPMVImageSlicer:
    """Slice geometry and pixel normalisation (``preprocessor_config.json`` fields of the same names)."""

    max_slice_nums: int
    scale_resolution: int
    patch_size: int
    norm_mean: tuple[float, float, float]
    norm_std: tuple[float, float, float]

    def best_resize(self, size: tuple[float, float], upscale: bool = False) -> tuple[int, int]:
        """(w, h) of about ``scale_resolution``^2 pixels, same aspect, both multiples of ``patch_size``."""
        width, height = size
        if width * height > self.scale_resolution**2 or upscale:
            r = width / height
            height = int(self.scale_resolution / math.sqrt(r))
            width = int(height * r)
        return _divisible(width, self.patch_size), _divisible(height, self.patch_size)

    def grid(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """(columns, rows) of the slice grid, or None when the image is small enough to stay whole."""
        width, height = size
        multiple = min(math.ceil(width * height / self.scale_resolution**2), self.max_slice_nums)
        if multiple <= 1:
            return None
        candidates = [
            (m, n // m)
            for n in (multiple - 1, multiple, multiple + 1)
            if n != 1 and n <= self.max_slice_nums
            for m in range(1, n + 1)
            if n % m == 0
        ]
        log_ratio = math.log(width / height)
        best, error = (1, 1), float("inf")
        for g in candidates:  # the first grid of least aspect error wins, as in the original's loop
            e = abs(log_ratio - math.log(g[0] / g[1]))
            if e < error:
                best, error = g, e
        return best

    def slices(self, image: Image.Image) -> list[Image.Image]:
        """The source image resized, then the grid's slices row by row (none when ``grid`` is None)."""
        grid = self.grid(image.size)
        if grid is None:
            return [image.resize(self.best_resize(image.size, upscale=True), resample=Image.Resampling.BICUBIC)]
        source = image.resize(self.best_resize(image.size), resample=Image.Resampling.BICUBIC)
        cols, rows = grid
        cell = self.best_resize(
            (_divisible(image.size[0], cols) / cols, _divisible(image.size[1], rows) / rows), upscale=True
        )
        refined = image.resize((cell[0] * cols, cell[1] * rows), resample=Image.Resampling.BICUBIC)
        w, h = refined.size[0] // cols, refined.size[1] // rows
        return [source] + [
            refined.crop((x, y, x + w, y + h)) for y in range(0, h * rows, h) for x in range(0, w * cols, w)
        ]

    def to_patches(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """(3, patch, h*w*patch) pixels (patches side by side, row-major) and the patch grid (h, w) of a slice."""
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3)
        arr = (arr - np.asarray(self.norm_mean, dtype=np.float32)) / np.asarray(self.norm_std, dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)
        p = self.patch_size
        cols = torch.nn.functional.unfold(x, (p, p), stride=(p, p))  # (3*p*p, L), L = h*w row-major
        strip = cols.reshape(3, p, p, -1).permute(0, 1, 3, 2).reshape(3, p, -1)
        return strip, (x.shape[1] // p, x.shape[2] // p)


class MiniCPMVProcessor:
    """``processor(text, images)`` -> ``input_ids`` (1, T) and one-element lists ``pixel_values``, ``tgt_sizes``,
    ``image_bound``, as the checkpoint's processor returns them; each ``(<image>./</image>)`` in ``text`` takes the
    next image."""

    def __init__(self, tokenizer: Any, slicer: MiniCPMVImageSlicer, *, feature_size: int, tokens: dict[str, str]):
        self.tokenizer, self.slicer, self.feature_size, self.tokens = tokenizer, slicer, feature_size, tokens
        ids = tokenizer.convert_tokens_to_ids([tokens["im_start"], tokens["im_end"], tokens["unk"]])
        absent = [t for t, i in zip((tokens["im_start"], tokens["im_end"], tokens["unk"]), ids) if i is None]
        if absent or len(set(ids)) != 3:
            raise ValueError(f"the tokenizer lacks the image tokens {absent or list(tokens.values())}")
        self.im_start_id, self.im_end_id = ids[0], ids[1]

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: Any, *, query_num: int) -> MiniCPMVProcessor:
        """Read ``preprocessor_config.json``; its ``image_feature_size`` must equal the model's ``query_num``."""
        f = Path(path) / "preprocessor_config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{path}: no preprocessor_config.json; download it with the checkpoint")
        c = json.loads(f.read_text())
        missing = [k for k in ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size") if k not in c]
        if missing:
            raise ValueError(f"{f}: no {missing}; copy them from the published preprocessor_config.json")
        if int(c["image_feature_size"]) != query_num:
            raise ValueError(
                f"{f}: image_feature_size {c['image_feature_size']} != config.json query_num {query_num}; every "
                "slice placeholder must hold one token per resampler query"
            )
        slicer = MiniCPMVImageSlicer(
            max_slice_nums=int(c["max_slice_nums"]),
            scale_resolution=int(c["scale_resolution"]),
            patch_size=int(c["patch_size"]),
            norm_mean=tuple(c.get("norm_mean", (0.5, 0.5, 0.5))),
            norm_std=tuple(c.get("norm_std", (0.5, 0.5, 0.5))),
        )
        names = {"im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>"}
        tokens = {k: c.get(k, v) for k, v in {**names, "unk": "<unk>"}.items()}
        return cls(tokenizer, slicer, feature_size=query_num, tokens=tokens)

    def placeholder(self, size: tuple[int, int]) -> str:
        """Source slice's placeholder, then ``<slice>`` + grid rows (joined by newlines) + ``</slice>``."""
        t = self.tokens
        one = t["im_start"] + t["unk"] * self.feature_size + t["im_end"]
        grid = self.slicer.grid(size)
        if grid is None:
            return one
        cols, rows = grid
        return one + t["slice_start"] + "\n".join(one * cols for _ in range(rows)) + t["slice_end"]

    def __call__(self, text: str, images: list[Image.Image] | None = None, **_: Any) -> dict[str, Any]:
        """Tokenise ``text`` (the tokenizer adds its special tokens, as ``tokenizer.encode`` does in the original)."""
        images = list(images or [])
        chunks = text.split(IMAGE_TAG)
        if len(chunks) - 1 != len(images):
            raise ValueError(f"the prompt has {len(chunks) - 1} {IMAGE_TAG} tags for {len(images)} images")
        pixels: list[torch.Tensor] = []
        sizes: list[tuple[int, int]] = []
        parts = [chunks[0]]
        for image, chunk in zip(images, chunks[1:]):
            image = image.convert("RGB")
            for s in self.slicer.slices(image):
                strip, hw = self.slicer.to_patches(s)
                pixels.append(strip)
                sizes.append(hw)
            parts += [self.placeholder(image.size), chunk]
        ids = torch.tensor(self.tokenizer.encode("".join(parts)), dtype=torch.long)
        starts = (ids == self.im_start_id).nonzero().flatten() + 1
        ends = (ids == self.im_end_id).nonzero().flatten()
        if len(starts) != len(ends) or len(starts) != len(pixels):
            raise ValueError(
                f"{len(starts)} {self.tokens['im_start']} and {len(ends)} {self.tokens['im_end']} tokens for "
                f"{len(pixels)} image slices; the question text must not contain these tokens"
            )
        return {
            "input_ids": ids[None],
            "pixel_values": [pixels],
            "tgt_sizes": [torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)],
            "image_bound": [
                torch.stack([starts, ends], dim=1) if len(starts) else torch.zeros(0, 2, dtype=torch.long)
            ],
        }
