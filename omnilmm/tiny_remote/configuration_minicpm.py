"""Config of the tiny MiniCPM-V look-alike: a Llama config plus the vision/resampler fields (``query_num``...)."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


class MiniCPMVConfig(LlamaConfig):
    """``model_type`` "minicpmv" as the real checkpoint; ``vision_hidden_size`` sizes the toy vision encoder."""

    model_type = "minicpmv"

    def __init__(
        self,
        query_num: int = 96,
        patch_size: int = 14,
        image_size: int = 448,
        vision_hidden_size: int = 64,
        batch_vision_input: bool = True,
        **kwargs: Any,
    ) -> None:
        self.query_num = query_num
        self.patch_size = patch_size
        self.image_size = image_size
        self.vision_hidden_size = vision_hidden_size
        self.batch_vision_input = batch_vision_input
        super().__init__(**kwargs)
