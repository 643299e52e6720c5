"""Tiny processor with the call contract of MiniCPM-Llama3-V 2.5's ``MiniCPMVProcessor``.

``processor(prompt, images, return_tensors="pt", max_length=...)`` replaces each ``(<image>./</image>)`` in the
prompt with ``<image>`` + ``query_num`` x ``<unk>`` + ``</image>`` and returns ``input_ids`` (1, T),
``attention_mask``, and per-sample lists ``pixel_values`` (patch strips (3, p, L*p)), ``tgt_sizes`` (n, 2) and
``image_bound`` (n, 2). The toy image processor resizes to a fixed square (no slicing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

IMAGE_PATTERN = "(<image>./</image>)"


class MiniCPMVImageProcessor(BaseImageProcessor):
    """Resize to ``image_size``, normalise with mean = std = 0.5, cut into a strip of ``patch_size`` patches."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 28, patch_size: int = 7, query_num: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size, self.patch_size, self.query_num = image_size, patch_size, query_num

    def strip(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        s, p = self.image_size, self.patch_size
        arr = np.asarray(image.convert("RGB").resize((s, s), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        x = (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5  # (3, s, s)
        patches = torch.nn.functional.unfold(x[None], (p, p), stride=(p, p))  # (1, 3*p*p, L)
        n = patches.shape[-1]
        strip = patches.reshape(3, p, p, n).permute(0, 1, 3, 2).reshape(3, p, n * p)
        return strip, torch.tensor([s // p, s // p])

    def preprocess(self, images: list[Image.Image], **kwargs: Any) -> BatchFeature:
        strips = [self.strip(im) for im in images]
        return BatchFeature({"pixel_values": [s for s, _ in strips], "tgt_sizes": [t for _, t in strips]})


class MiniCPMVProcessor:
    """``AutoProcessor`` entry point: ``image_processor`` + ``tokenizer``."""

    def __init__(self, image_processor: MiniCPMVImageProcessor, tokenizer: Any) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """Called by ``AutoProcessor`` on remote classes; nothing to register for a local toy."""

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> MiniCPMVProcessor:
        import json
        from pathlib import Path

        cfg = json.loads((Path(path) / "preprocessor_config.json").read_text())
        keys = ("image_size", "patch_size", "query_num")
        image_processor = MiniCPMVImageProcessor(**{k: cfg[k] for k in keys})
        return cls(image_processor, AutoTokenizer.from_pretrained(path, **kwargs))

    def __call__(
        self,
        text: str,
        images: list[Image.Image] | None = None,
        max_length: int | None = None,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        images = list(images or [])
        pieces = text.split(IMAGE_PATTERN)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(images)} images")
        tok = self.tokenizer
        placeholder = "<image>" + tok.unk_token * self.image_processor.query_num + "</image>"
        ids = tok.encode(placeholder.join(pieces), add_special_tokens=False)
        if max_length is not None:
            ids = ids[:max_length]
        input_ids = torch.tensor(ids)
        starts = torch.where(input_ids == tok.convert_tokens_to_ids("<image>"))[0] + 1
        ends = torch.where(input_ids == tok.convert_tokens_to_ids("</image>"))[0]
        bounds = torch.stack([starts, ends], dim=1) if len(starts) else torch.zeros((0, 2), dtype=torch.long)
        feats = self.image_processor.preprocess(images) if images else {"pixel_values": [], "tgt_sizes": []}
        tgt = torch.stack(feats["tgt_sizes"]) if images else torch.zeros((0, 2), dtype=torch.long)
        return BatchFeature(
            {
                "input_ids": input_ids.unsqueeze(0),
                "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "pixel_values": [feats["pixel_values"]],
                "tgt_sizes": [tgt],
                "image_bound": [bounds],
                "image_sizes": [[im.size for im in images]],
            }
        )
