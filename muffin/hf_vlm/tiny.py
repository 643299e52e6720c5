"""Tiny random checkpoints of Qwen2.5-VL, LLaVA-NeXT, Idefics3, SmolVLM and Gemma 3, built offline.

Each builder uses the real transformers config, model, image-processor, processor and tokenizer classes, trains a
few-hundred-token BPE of the checkpoint's own tokenizer style in memory, sets the published checkpoint's chat
template, and saves everything with ``save_pretrained``, so ``muffin.load_family(dir)`` loads it like a hub model:

    python -m utils.tiny_models qwen2_5_vl /tmp/tiny-qwen2_5_vl
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from utils.tokenizer import ALPHABET, BASE_CORPUS

# Two layers of width 64 (LM) / 32 (vision): every architecture's code path runs, in milliseconds on a CPU.
TINY_LM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# Texts that start with an answer word, so that "Yes"/"No" open an answer as one token in every tokenizer style.
ANSWER_STARTS = [
    "Yes",
    "No",
    "yes",
    "no",
    "Yes, there is.",
    "No, there is not.",
    "The image shows",
    "There is",
    "Answer: yes",
    "Answer: no",
    "Answer: Yes",
    "Answer: No",
]

# Chat templates of the published checkpoints (Qwen/Qwen2.5-VL-7B-Instruct, llava-hf/llava-v1.6-mistral-7b-hf,
# HuggingFaceM4/Idefics3-8B-Llama3, HuggingFaceTB/SmolVLM-Instruct, google/gemma-3-4b-it), re-indented. The
# LLaVA-NeXT one keeps the published quirks on purpose: it closes the assistant turn with the text '<\s>' (not the
# eos token) and ignores add_generation_prompt; the family must cope with both.
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
_IDEFICS3_BODY = (
    "{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "<|begin_of_text|>" + _IDEFICS3_BODY
SMOLVLM_TEMPLATE = "<|im_start|>" + _IDEFICS3_BODY
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    '{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}'
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)


def _bpe(
    template_cls: type, special_tokens: Sequence[str], *, byte_level: bool, vocab_size: int = 400
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of a BPE in the style of ``template_cls`` (byte-level or "▁"-word), trained on the base corpus.

    The special tokens take ids 0..n-1 in the given order. A few hundred tokens keep the embedding tiny while
    the chat markup, "Yes"/"No" and common caption words still get tokens of their own.
    """
    tok = Tokenizer(models.BPE())
    if byte_level:  # the class's default (empty) backend carries its tokenisation rules
        backend = template_cls()._tokenizer
        tok.normalizer, tok.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    else:
        # Llama / Gemma pre-tokenise a whole text as one "word"; learning merges word by word instead gives the
        # "▁Yes"-style tokens the real vocabularies have, and those merges stay valid for the class's own rules.
        # Gemma writes no "▁" before a text's first word (a turn's first answer word), Llama always does.
        prepend = "never" if "Gemma" in template_cls.__name__ else "always"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else ALPHABET
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator((list(BASE_CORPUS) + ANSWER_STARTS) * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _seeded_model(model_cls: type, config: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _save(path: Path, model: torch.nn.Module, processor: Any, eos_ids: Sequence[int], pad_id: int) -> Path:
    """Save model + processor; the generation config stops on every end-of-turn id, like the published ones."""
    model.generation_config.eos_token_id = list(eos_ids)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_qwen2_5_vl(path: Path, seed: int = 0, **kw: Any) -> Path:
    """Qwen2.5-VL: window-attention ViT (patch 14, 2x2 merger) + Qwen2 LM with M-RoPE; dynamic resolution.

    Images are resized to multiples of 28 px between 56x56 and 112x112, so an image costs 4 to 16 tokens.
    """
    special = "<|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>"
    special = special.split()
    vocab, merges = _bpe(tf.Qwen2Tokenizer, special, byte_level=True)
    tokenizer = tf.Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=special[1:],
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    pixels = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=112 * 112)
    processor = tf.Qwen2_5_VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(**pixels),
        video_processor=tf.Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_VL_TEMPLATE,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
    text = dict(
        **TINY_LM,
        vocab_size=len(tokenizer),
        rope_parameters=rope,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    config = tf.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **kw,
    )
    model = _seeded_model(tf.Qwen2_5_VLForConditionalGeneration, config, seed)
    return _save(path, model, processor, [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"])


def build_tiny_llava_next(path: Path, seed: int = 0, **kw: Any) -> Path:
    """LLaVA-NeXT (v1.6, Mistral template): CLIP ViT tiles ("AnyRes" grid) + 2-layer MLP + Mistral LM.

    Tiles are 32x32 px with patch 8; pinpoints up to 64x64, so an image costs 16 base tokens plus its grid.
    """
    special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<image>"]
    vocab, merges = _bpe(tf.LlamaTokenizer, special, byte_level=False)
    tokenizer = tf.LlamaTokenizer(
        vocab=vocab, merges=merges, extra_special_tokens=special[3:], pad_token="<unk>", image_token="<image>"
    )
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = tf.LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = tf.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_MISTRAL_TEMPLATE,
    )
    text = tf.MistralConfig(
        **TINY_LM, vocab_size=len(tokenizer), sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    vision = tf.CLIPVisionConfig(**TINY_VIT, image_size=32, patch_size=8, projection_dim=32)
    config = tf.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=16,
        **kw,
    )
    model = _seeded_model(tf.LlavaNextForConditionalGeneration, config, seed)
    return _save(path, model, processor, [2], 0)


def _idefics3_tokenizer(arch: str) -> tuple[Any, list[str], list[str], str]:
    """(tokenizer, special tokens, end-of-turn tokens, pad token) of Idefics3 (Llama 3) or SmolVLM (SmolLM)."""
    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    image = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid]
    if arch == "idefics3":
        # Llama 3's tokenizer: byte-level BPE with a GPT-4-style split regex, loaded as PreTrainedTokenizerFast.
        special = ["<|begin_of_text|>", "<|end_of_text|>", *image]
        vocab, merges = _bpe(tf.Qwen2Tokenizer, special, byte_level=True)
        backend = tf.Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)._tokenizer
        tokenizer = tf.PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            pad_token="<|end_of_text|>",
            extra_special_tokens=image,
        )
        return tokenizer, special, ["<end_of_utterance>", "<|end_of_text|>"], "<|end_of_text|>"
    # SmolLM's tokenizer: GPT-2 byte-level BPE with <|im_start|> / <|im_end|> as bos / eos.
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *image]
    vocab, merges = _bpe(tf.GPT2Tokenizer, special, byte_level=True)
    tokenizer = tf.GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        extra_special_tokens=image,
    )
    return tokenizer, special, ["<end_of_utterance>", "<|im_end|>"], "<|im_end|>"


def _idefics3_like(path: Path, seed: int, arch: str, **kw: Any) -> Path:
    """Idefics3 and SmolVLM: SigLIP-style ViT on 32 px tiles (patch 8) + pixel-shuffle connector (x2) + Llama LM.

    Images are split into up to 2x2 tiles of 32 px plus a global view; each tile costs (32/8)^2 / 2^2 = 4 tokens.
    """
    tokenizer, special, eot, pad = _idefics3_tokenizer(arch)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    image_kw = dict(do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    text = tf.LlamaConfig(
        **TINY_LM,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=ids[eot[-1]],
        pad_token_id=ids[pad],
    )
    common = dict(
        vision_config=dict(**TINY_VIT, image_size=32, patch_size=8),
        text_config=text,
        image_token_id=ids["<image>"],
        scale_factor=2,
        pad_token_id=ids[pad],
        **kw,
    )
    image_seq_len = (32 // 8) ** 2 // 2**2
    if arch == "idefics3":
        processor = tf.Idefics3Processor(
            image_processor=tf.Idefics3ImageProcessor(**image_kw),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=IDEFICS3_TEMPLATE,
        )
        model = _seeded_model(tf.Idefics3ForConditionalGeneration, tf.Idefics3Config(**common), seed)
    else:
        processor = tf.SmolVLMProcessor(
            image_processor=tf.SmolVLMImageProcessor(**image_kw),
            video_processor=tf.SmolVLMVideoProcessor(size=image_kw["size"], max_image_size=image_kw["max_image_size"]),
            tokenizer=tokenizer,
            image_seq_len=image_seq_len,
            chat_template=SMOLVLM_TEMPLATE,
        )
        model = _seeded_model(tf.SmolVLMForConditionalGeneration, tf.SmolVLMConfig(**common), seed)
    return _save(path, model, processor, [ids[t] for t in eot], ids[pad])


def build_tiny_idefics3(path: Path, seed: int = 0, **kw: Any) -> Path:
    """Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3 format); see ``_idefics3_like``."""
    return _idefics3_like(path, seed, "idefics3", **kw)


def build_tiny_smolvlm(path: Path, seed: int = 0, **kw: Any) -> Path:
    """SmolVLM (HuggingFaceTB/SmolVLM-Instruct format; its processor needs ``num2words``); see ``_idefics3_like``."""
    return _idefics3_like(path, seed, "smolvlm", **kw)


def build_tiny_gemma3(path: Path, seed: int = 0, **kw: Any) -> Path:
    """Gemma 3: SigLIP ViT (32 px, patch 8) + average-pool projector to 4 soft tokens + Gemma 3 LM (tied head)."""
    special = "<pad> <eos> <bos> <unk> <mask> <start_of_turn> <end_of_turn> <start_of_image> <end_of_image>"
    special = [*special.split(), "<image_soft_token>"]
    vocab, merges = _bpe(tf.GemmaTokenizer, special, byte_level=False)
    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
        "sot_token": "<start_of_turn>",
        "eot_token": "<end_of_turn>",
    }
    tokenizer = tf.GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=named)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    tokens_per_image = 4
    image_processor = tf.Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = tf.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    # sliding_window_pattern 2: layer 0 sliding, layer 1 global, the published models' hybrid layout in miniature
    text = tf.Gemma3TextConfig(
        **TINY_LM,
        vocab_size=len(tokenizer),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        sliding_window_pattern=2,
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    vision = tf.SiglipVisionConfig(**TINY_VIT, image_size=32, patch_size=8, vision_use_head=False)
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        **kw,
    )
    model = _seeded_model(tf.Gemma3ForConditionalGeneration, config, seed)
    return _save(path, model, processor, [ids["<eos>"], ids["<end_of_turn>"]], ids["<pad>"])
