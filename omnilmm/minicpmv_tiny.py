"""A tiny random MiniCPM-Llama3-V 2.5 in the published format, for tests and CPU runs without the 8B download.

    python -m utils.tiny_models minicpmv /tmp/tiny-minicpmv

``shrink`` takes a published ``config.json`` / ``preprocessor_config.json`` and changes only sizes (and the token
ids that follow the smaller vocabulary); the weights carry every published key name at the shrunk shapes. The
tokenizer is a byte-level BPE with Llama-3's split pattern and the published special tokens in published order.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from utils.tokenizer import BASE_CORPUS

# The published openbmb/MiniCPM-Llama3-V-2_5 config.json (hub revision 45208262) as far as the loaders read it;
# used when no published file is given. tests/test_minicpmv_native.py checks it field by field against the file.
FORMAT_CONFIG: dict[str, Any] = {
    "_name_or_path": "openbmb/MiniCPM-Llama3-V-2_5",
    "version": "2.5",
    "architectures": ["MiniCPMV"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    },
    "batch_vision_input": True,
    "bos_token_id": 128000,
    "drop_vision_last_layer": False,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_size": 448,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "mm_use_im_start_end": True,
    "model_type": "minicpmv",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "patch_size": 14,
    "pretraining_tp": 1,
    "query_num": 96,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
    "slice_mode": True,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.40.0",
    "use_cache": False,
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "model_type": "idefics2",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
    "vocab_size": 128256,
}
FORMAT_PREPROCESSOR: dict[str, Any] = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "auto_map": {
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
    },
    "processor_class": "MiniCPMVProcessor",
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "image_feature_size": 96,
    "im_start": "<image>",
    "im_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "unk": "<unk>",
    "norm_mean": [0.5, 0.5, 0.5],
    "norm_std": [0.5, 0.5, 0.5],
    "version": 2.5,
}
# The published chat template (tokenizer_config.json): it always ends with the assistant header.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
# The first 22 published added tokens (ids 128000-128021), used when no published tokenizer_config.json is given.
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<unk>", "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
    "<|eot_id|>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>",
    "</point>", "<slice>", "</slice>",
]  # fmt: skip
# Llama-3's pre-tokenizer split (tiktoken's cl100k-style pattern), then byte-level.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
TINY_TEXT = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "query_num": 8, "image_size": 28}  # fmt: skip
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
               "image_size": 70}  # fmt: skip
TINY_PREPROCESSOR = {"scale_resolution": 28, "image_feature_size": 8}


def build_llama3_style_tokenizer(special_tokens: list[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Byte-level BPE (Llama-3's split) on the base corpus; ``special_tokens`` appended in order after the BPE vocab.

    Like Llama-3's tokenizer.json, encoding prepends ``<|begin_of_text|>`` (its TemplateProcessing post-processor).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(list(BASE_CORPUS) * 20, trainer)
    tok.add_special_tokens(special_tokens)
    bos = special_tokens[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def shrink(config: dict[str, Any], preprocessor: dict[str, Any], vocab: dict[str, int]) -> tuple[dict, dict]:
    """Tiny copies of the published configs: sizes shrunk, token ids moved to ``vocab``, everything else kept."""
    config, preprocessor = copy.deepcopy(config), copy.deepcopy(preprocessor)
    config.update(TINY_TEXT)
    config["vision_config"].update(TINY_VISION)
    config["vocab_size"] = len(vocab)
    config["bos_token_id"], config["eos_token_id"] = vocab["<|begin_of_text|>"], vocab["<|end_of_text|>"]
    preprocessor.update(TINY_PREPROCESSOR)
    preprocessor["image_feature_size"] = config["query_num"]
    return config, preprocessor


def build_tiny_minicpmv(
    path: str | Path, seed: int = 0, *, published: str | Path | None = None, vocab_size: int = 1000
) -> Path:
    """Save a tiny random MiniCPM-Llama3-V 2.5 at ``path`` (loadable natively and with no remote code); return it.

    Args:
        published: a folder with the published config.json, preprocessor_config.json and tokenizer_config.json to
            shrink (the defaults above otherwise).
    """
    from omnilmm.minicpmv_model import MiniCPMV, MiniCPMVConfig, save_minicpmv

    path = Path(path)
    config, pre, tok_cfg = FORMAT_CONFIG, FORMAT_PREPROCESSOR, None
    if published is not None:
        src = Path(published)
        config = json.loads((src / "config.json").read_text())
        pre = json.loads((src / "preprocessor_config.json").read_text())
        tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    specials = SPECIAL_TOKENS
    if tok_cfg is not None:
        added = tok_cfg["added_tokens_decoder"]
        specials = [added[k]["content"] for k in sorted(added, key=int)]
    tok = build_llama3_style_tokenizer(specials, vocab_size=vocab_size)
    tok.bos_token, tok.eos_token, tok.unk_token = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"
    tok.pad_token = tok_cfg["pad_token"] if tok_cfg else "!"
    tok.chat_template = tok_cfg["chat_template"] if tok_cfg else CHAT_TEMPLATE
    config, pre = shrink(config, pre, tok.get_vocab())
    torch.manual_seed(seed)
    model = MiniCPMV(MiniCPMVConfig.from_dict(config)).eval()
    save_minicpmv(model, path)
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return path
