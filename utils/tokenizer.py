"""Build small Llama-style (sentencepiece-like, ``▁`` word boundaries) fast tokenizers offline.

Tiny test checkpoints and the synthetic world need a tokenizer without the hub; this trains a BPE model in
memory on a corpus in about a second. The result is a ``PreTrainedTokenizerFast`` with ``<unk>``, ``<s>``,
``</s>`` at ids 0, 1, 2 like Llama's, saved and loaded with ``save_pretrained`` / ``AutoTokenizer``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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
