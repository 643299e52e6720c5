"""Load published tokenizers exactly, and build small Llama-style fast tokenizers offline.

``load_tokenizer`` reads a checkpoint's tokenizer; a sentencepiece-only one (``tokenizer.model``, no
``tokenizer.json``, as liuhaotian/llava-v1.5-7b ships) needs ``sentencepiece`` and ``protobuf`` and is made to
tokenise as sentencepiece does. ``build_tokenizer`` trains a tiny BPE (``<unk>``, ``<s>``, ``</s>`` at ids 0-2).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Enough text that the chat templates, yes/no answers and common description words get their own tokens.
BASE_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: ASSISTANT:",
    "You are an artificial intelligence assistant, which gives helpful, detailed, and polite answers to the "
    "human's questions. <|user|> <|assistant|> <|system|>",
    "yes Yes no No. Yes, there is. No, there is not. Is there a dog in the image? Answer yes or no.",
    "Describe the image in detail. What is in the picture? The image shows a car, a sheep, a person, a dog, a cat, "
    "a table, a chair, a cup, a bottle, a bus, a train, a bird, a horse, on the road, next to the tree, in the sky.",
    "There is a red circle. There are two blue squares. The green triangle is on the left. How many objects?",
    "0 1 2 3 4 5 6 7 8 9 one two three four five six seven eight nine ten",
]
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()/[]{}<>|_#*+=&%$@\n▁")


def build_tokenizer(
    corpus: Iterable[str] = (),
    *,
    vocab_size: int = 600,
    extra_special_tokens: Sequence[str] = (),
    repeat_base: int = 20,
) -> PreTrainedTokenizerFast:
    """Train a Metaspace BPE tokenizer on ``corpus`` plus a base corpus; deterministic for the same inputs.

    Args:
        corpus: extra text (e.g. the synthetic world's descriptions) to learn merges from.
        vocab_size: target vocabulary size before ``extra_special_tokens``.
        extra_special_tokens: tokens never split (e.g. ``<image>``, ``<im_patch>``), appended after the BPE vocab.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=ALPHABET, show_progress=False
    )
    texts = list(BASE_CORPUS) * repeat_base + list(corpus)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    if extra_special_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return fast


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package ("google") is missing
        return False


def load_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(path)``; a sentencepiece-only tokenizer is checked for and made exact.

    transformers 5 turns a ``tokenizer.model`` into a fast tokenizer whose Metaspace pre-tokenizer adds the
    sentencepiece word-boundary ``▁`` only at the very start of a text, and not when the text starts with a space.
    sentencepiece (``add_dummy_prefix``) adds it to every piece of text, including the piece after a special token
    such as ``<image>``; so do the original LLaVA code (which tokenises the text around the image separately) and
    llava-hf's published ``tokenizer.json``. ``match_sentencepiece`` restores that behaviour.
    """
    path = Path(path)
    sentencepiece_only = (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file()
    if sentencepiece_only:
        missing = [
            pkg
            for pkg, mod in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
            if not _installed(mod)
        ]
        if missing:
            raise ImportError(
                f"{path} holds a sentencepiece tokenizer.model and no tokenizer.json; reading it needs the packages "
                f"sentencepiece and protobuf ({', '.join(missing)} not installed): pip install sentencepiece protobuf"
            )
    tok = AutoTokenizer.from_pretrained(path)
    if sentencepiece_only:
        match_sentencepiece(tok, path / "tokenizer.model")
    return tok


def match_sentencepiece(tok: Any, model_file: Path) -> None:
    """Give ``tok`` (converted from ``model_file``) sentencepiece's normalisation: ``▁`` before every text piece.

    Applied only to the conversion transformers makes for Llama-style models (a ``Metaspace`` pre-tokenizer) of a
    sentencepiece model with ``add_dummy_prefix`` and without ``remove_extra_whitespaces``; other tokenizers are
    left as loaded.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.normalizer_spec
    backend = tok.backend_tokenizer
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if [p.get("type") for p in steps] != ["Metaspace"] or spec.remove_extra_whitespaces:
        logger.info("%s: tokenizer left as transformers converted it (pre-tokenizer %s)", model_file, pre)
        return
    replace = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), replace] if spec.add_dummy_prefix else [replace]
    )
    backend.pre_tokenizer = None
