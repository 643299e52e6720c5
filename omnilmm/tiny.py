"""Tiny random checkpoints of OmniLMM 12B and of a MiniCPM-Llama3-V 2.5 look-alike, built offline.

    python -m utils.tiny_models omnilmm /tmp/tiny-omnilmm
    python -m utils.tiny_models minicpmv /tmp/tiny-minicpmv

``build_tiny_omnilmm`` is the exact OmniLMM architecture (EVA02-style timm ViT, resampler, Mistral LM) at toy
sizes, saved in the published layout. ``build_tiny_minicpmv`` writes a LOCAL remote-code checkpoint (config.json
with ``auto_map`` + the Python files of ``omnilmm/tiny_remote/``) whose public interface is the one our
``MiniCPMVFamily`` uses from the real ``openbmb/MiniCPM-Llama3-V-2_5`` code; its internals are deliberately small.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from omnilmm.config import IM_END, IM_PATCH, IM_START, ZEPHYR_CHAT_TEMPLATE, OmniLMMConfig
from utils.tokenizer import build_tokenizer

TINY_VISION = {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2.0, "img_size": 28}
REMOTE_DIR = Path(__file__).resolve().parent / "tiny_remote"
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MINICPMV_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<image>",
    "</image>",
    "<slice>",
    "</slice>",
]


def _with_bos(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Make ``tok(text)`` prepend ``<s>`` like the Llama/Mistral sentencepiece tokenizers."""
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    return tok


def tiny_omnilmm_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """The offline tokenizer of an OmniLMM checkpoint: base BPE vocabulary (plus ``corpus``), the image markers as
    special tokens, ``<s>`` prepended like Mistral's tokenizer, the Zephyr chat template."""
    tok = _with_bos(build_tokenizer(corpus, vocab_size=vocab_size, extra_special_tokens=[IM_PATCH, IM_START, IM_END]))
    tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    return tok


def tiny_omnilmm_config(vocab_size: int, **overrides: Any) -> OmniLMMConfig:
    """A 2-layer Mistral (hidden 256, 2 resampler heads), 2-block EVA02 tower, 4 queries, 56-pixel images."""
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
        rms_norm_eps=1e-5,
        num_query=4,
        image_size=56,
        vision_kwargs=dict(TINY_VISION),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        architectures=["OmniLMMForCausalLM"],
    )
    kw.update(overrides)
    return OmniLMMConfig(**kw)


def build_tiny_omnilmm(path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random OmniLMM checkpoint (model + Zephyr-template tokenizer) at ``path``; return the path.

    ``overrides`` go to the config (e.g. ``num_query=9``, ``image_size=42``).
    """
    from omnilmm.modeling import OmniLMMForCausalLM

    path = Path(path)
    tok = tiny_omnilmm_tokenizer()
    config = tiny_omnilmm_config(len(tok), **overrides)
    config.im_start_token_id, config.im_end_token_id, config.im_patch_token_id = tok.convert_tokens_to_ids(
        [IM_START, IM_END, IM_PATCH]
    )
    torch.manual_seed(seed)
    model = OmniLMMForCausalLM(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_minicpmv(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny local remote-code model with MiniCPM-Llama3-V 2.5's loading and calling interface.

    The directory holds ``config.json`` (``model_type: minicpmv`` and ``auto_map`` for AutoConfig / AutoModel),
    ``preprocessor_config.json`` (``auto_map`` for AutoProcessor), the weights, a Llama-3 style tokenizer with the
    real checkpoint's chat template, and the remote-code files. Loading it needs ``trust_remote_code=True``.
    """
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for src in sorted(REMOTE_DIR.glob("*_minicpm*.py")):
        shutil.copy(src, path / src.name)
    tok = build_tokenizer(extra_special_tokens=MINICPMV_SPECIAL)
    tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>"
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    tok.save_pretrained(path)
    config = dict(
        model_type="minicpmv",
        architectures=["MiniCPMV"],
        auto_map={"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV"},
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        query_num=4,
        patch_size=7,
        image_size=28,
        vision_hidden_size=32,
        tie_word_embeddings=False,
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "MiniCPMVImageProcessor",
                "processor_class": "MiniCPMVProcessor",
                "image_size": 28,
                "patch_size": 7,
                "query_num": 4,
                "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor"},
            },
            indent=2,
        )
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(path, trust_remote_code=True), trust_remote_code=True)
    model.save_pretrained(path)
    return path
