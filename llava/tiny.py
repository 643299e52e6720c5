"""Tiny random LLaVA 1.5 checkpoints (llava-hf and original layouts) built from the real config classes, offline."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava import convert
from llava.family import LlavaFamily, save_original_format
from llava.preprocess import make_image_processor
from utils.tokenizer import build_tokenizer


def tiny_llava_model(
    tokenizer: Any,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    max_positions: int = 512,
) -> LlavaForConditionalGeneration:
    """A random ``LlavaForConditionalGeneration`` whose vocabulary matches ``tokenizer`` (rounded up to 64)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 16),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=convert.round_up(len(tokenizer)),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(convert.IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 600) -> Any:
    """The tokenizer of a tiny llava-hf checkpoint: base BPE vocabulary, then ``<image>`` and ``<pad>``."""
    tok = build_tokenizer(corpus, vocab_size=vocab_size)
    tok.pad_token = None
    tok.add_special_tokens({"additional_special_tokens": [convert.IMAGE_TOKEN], "pad_token": convert.PAD_TOKEN})
    return tok


def build_tiny_llava_hf(
    path: Path, *, seed: int = 0, tokenizer: Any = None, corpus: Iterable[str] = (), **sizes: Any
) -> Path:
    """Save a tiny random llava-hf checkpoint (config, safetensors, tokenizer, preprocessor) at ``path``."""
    tokenizer = tokenizer or tiny_llava_tokenizer(corpus)
    model = tiny_llava_model(tokenizer, seed=seed, **sizes)
    fam = LlavaFamily(model, tokenizer, make_image_processor(model.config.vision_config.image_size))
    fam.save_pretrained(path)
    return Path(path)


def build_tiny_llava_original(path: Path, *, seed: int = 0, **sizes: Any) -> Path:
    """Save the same kind of tiny model in the original ``llava_llama`` layout (no image token in the vocab)."""
    tokenizer = tiny_llava_tokenizer()
    model = tiny_llava_model(tokenizer, seed=seed, **sizes)
    save_original_format(model, tokenizer, path, vision_tower="tiny-clip")
    return Path(path)
