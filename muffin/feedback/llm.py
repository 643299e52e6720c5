"""A batched, greedy text-only chat LM (any HF causal LM with a chat template) and prompt-template helpers.

Drives the divide (split into facts) and change-question models: each request is one user turn rendered with the
checkpoint's own chat template (``add_generation_prompt=True``), batches are left padded, decoding is greedy so a
rerun gives the same output. ``build_tiny_chat_lm`` makes a random tiny Llama for CPU tests and dry runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.cuda import resolve_device

logger = logging.getLogger(__name__)

# A Llama-3-style template (the released split/changeq models are Llama-3-8B fine-tunes); used by the tiny model.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def read_template(path: str | Path | None, default: str) -> str:
    """The prompt template in ``path`` (e.g. the released model's ``split_facts.txt``), else ``default``."""
    if path is None:
        return default
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' does not exist; pass --prompt-file a text file")
    return path.read_text()


def fill(template: str, **slots: str) -> str:
    """Replace ``{name}`` slots literally (``str.format`` would choke on the templates' other braces)."""
    for name, value in slots.items():
        template = template.replace("{" + name + "}", value)
    return template


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` space-separated words (the released split model saw prompts cut to 300)."""
    if not max_words:
        return text
    words = text.split(" ")
    return text if len(words) <= max_words else " ".join(words[:max_words])


class ChatLM:
    """Greedy batched completion of single-turn chat prompts with a causal LM.

    Example:
        >>> lm = ChatLM.from_pretrained("checkpoints/split-llama3-8b")  # doctest: +SKIP
        >>> lm.complete(["Split into facts: ..."], max_new_tokens=256)  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer of '{name}' has no chat template; use an instruction-tuned checkpoint "
                "(or set tokenizer.chat_template in its tokenizer_config.json)"
            )
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = sorted(
            {
                i
                for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>"))
                if isinstance(i, int) and i != tokenizer.unk_token_id
            }
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | None = None
    ) -> ChatLM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from muffin.family import resolve_dtype

        device = resolve_device(device)
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype)
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"text model '{path}' is not a local directory; download it first")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        logger.info("loaded text model %s (%s, %s)", path, dtype, device)
        return cls(model, tok, name=Path(path).name)

    def render(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    @torch.inference_mode()
    def complete(
        self, prompts: Sequence[str], *, max_new_tokens: int = 512, batch_size: int = 8, progress: bool = False
    ) -> list[str]:
        """Greedy completions of ``prompts`` (one user turn each), special tokens stripped."""
        out: list[str] = []
        device = next(self.model.parameters()).device
        for i in tqdm(range(0, len(prompts), batch_size), desc="chat-lm", disable=not progress):
            texts = [self.render(p) for p in prompts[i : i + batch_size]]
            # the rendered template already holds the BOS token: do not add a second one
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ids = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_ids or None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = ids[:, enc["input_ids"].shape[1] :]  # (B, T_new)
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


def build_tiny_chat_lm(path: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny random Llama chat model (BPE tokenizer with a Llama-3-style chat template) at ``path``.

    Its output is random text, which is what the tests need to exercise the "unparseable output" path.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.tokenizer import build_tokenizer

    path = Path(path)
    corpus = ["### Facts:\n- The cat is black.\n- There is a dog.", "### Modified sentences:\n- Is the cat black?"]
    tok = build_tokenizer(
        corpus, vocab_size=400, extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
