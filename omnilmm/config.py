"""``OmniLMMConfig``: the config of OmniLMM 12B / RLAIF-V 12B (a Mistral config plus the multimodal fields).

The published ``config.json`` is a Mistral config with ``model_type: "omnilmm"``, ``num_query`` (256 resampler
queries) and ``image_size`` (448). We add two optional fields, ``vision_model_name`` and ``vision_kwargs``, so tiny
test models can shrink the timm tower; their defaults are the published architecture.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import MistralConfig

# The system prompt OmniLMM 12B was trained with (RLAIF-V's omni_preprocess inserts it when a chat has none).
OMNILMM_SYSTEM = (
    "You are an artificial intelligence assistant, which gives helpful, detailed, and polite answers to the "
    "human's questions."
)
# Zephyr's chat template (OmniLMM 12B's LM is Zephyr-7B-beta); used when a tokenizer ships no template.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
IM_START, IM_END, IM_PATCH = "<im_start>", "<im_end>", "<im_patch>"
DEFAULT_VISION_MODEL = "eva02_enormous_patch14_clip_224"


class OmniLMMConfig(MistralConfig):
    """Mistral config + ``num_query``, ``image_size`` and the timm vision-tower recipe.

    Args:
        num_query: resampler queries = image tokens per image; a perfect square (the query grid). Published: 256.
        image_size: side of the square input image in pixels. Published: 448.
        vision_model_name: timm architecture of the vision tower.
        vision_kwargs: extra ``timm.create_model`` kwargs (e.g. ``depth``/``embed_dim`` for tiny test models).
        resampler_num_heads: attention heads of the resampler; default ``hidden_size // 128`` as published.
        **kwargs: every ``MistralConfig`` field (and unknown published fields such as ``mm_vision_tower``).
    """

    model_type = "omnilmm"

    def __init__(
        self,
        num_query: int | None = None,
        image_size: int | None = None,
        vision_model_name: str = DEFAULT_VISION_MODEL,
        vision_kwargs: dict[str, Any] | None = None,
        resampler_num_heads: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_query = num_query
        self.image_size = image_size
        self.vision_model_name = vision_model_name
        self.vision_kwargs = dict(vision_kwargs or {})
        self.resampler_num_heads = resampler_num_heads
        super().__init__(**kwargs)

    # Validated when a model is built, not in __init__: transformers instantiates default configs internally
    # (e.g. to diff against on save), and those must not raise.
    def validate_multimodal(self, where: str = "config") -> None:
        """Raise ``ValueError`` naming the field and the fix when the multimodal fields are unusable."""
        nq = self.num_query
        if nq is None:
            raise ValueError(
                f"{where}: 'num_query' is missing; OmniLMM needs the number of resampler queries "
                '(the published OmniLMM-12B / RLAIF-V-12B config.json has "num_query": 256)'
            )
        if not isinstance(nq, int) or isinstance(nq, bool) or nq <= 0 or math.isqrt(nq) ** 2 != nq:
            raise ValueError(
                f"{where}: 'num_query'={nq!r} is not a positive perfect square; the resampler lays "
                "its queries on a square grid (published value: 256 = 16x16)"
            )
        size = self.image_size
        if size is None:
            raise ValueError(
                f"{where}: 'image_size' is missing; OmniLMM needs the square input size in pixels "
                '(the published config.json has "image_size": 448)'
            )
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(
                f"{where}: 'image_size'={size!r} must be a positive integer number of pixels (published value: 448)"
            )
        heads = self.resampler_heads
        if heads <= 0 or self.hidden_size % heads:
            raise ValueError(
                f"{where}: the resampler needs hidden_size ({self.hidden_size}) divisible by its "
                f"head count ({heads}); set 'resampler_num_heads' to a divisor of hidden_size"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"{where}: hidden_size={self.hidden_size} must be divisible by 4 for the resampler's "
                "2-D sin-cos position embedding"
            )

    @property
    def resampler_heads(self) -> int:
        """Resampler attention heads: ``resampler_num_heads`` or, as published, ``hidden_size // 128``."""
        return self.resampler_num_heads or max(1, self.hidden_size // 128)

    @property
    def query_grid(self) -> int:
        """Side of the square query grid (16 for the published 256 queries)."""
        return math.isqrt(self.num_query)
