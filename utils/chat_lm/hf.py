"""The chat LM as a local Hugging Face causal LM with a chat template, batched with left padding.

Each request is rendered with the checkpoint's own chat template (``add_generation_prompt=True``); decoding is greedy
at temperature 0, so a rerun gives the same text. A re-ask (``attempt > 0``) at temperature 0 samples at
``REASK_TEMPERATURE`` with a seed fixed by the attempt, since greedy decoding would repeat the unparseable answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from utils.chat_lm.base import ChatRequest, ChatResponse, ChatStats, cached_complete
from utils.chat_lm.cache import RequestCache
from utils.cuda import resolve_device

logger = logging.getLogger(__name__)

REASK_TEMPERATURE = 0.7
# RefoMB's published 1e-5 asks an API for near-greedy decoding; sampling at it divides fp16 logits into inf
GREEDY_BELOW = 1e-3


def checkpoint_fingerprint(path: Path) -> str:
    """Short hash of config.json and the weight files' names and sizes: a retrained model at the same path gets
    a new id, hence fresh cache entries."""
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


def stop_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """Where an answer ends: the tokenizer's EOS, the generation config's EOS ids (instruction models end a turn with
    their own token) and Llama-3's ``<|eot_id|>`` when the vocabulary has it (the released split / change-question
    models are Llama-3 fine-tunes whose generation config may list only ``<|end_of_text|>``)."""
    gen = getattr(generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(gen if isinstance(gen, list) else [gen])}
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if eot != tokenizer.unk_token_id:
        ids.add(eot)
    return sorted(i for i in ids if isinstance(i, int))


class HFChatLM:
    """A local causal LM answering chat requests.

    Example:
        >>> lm = HFChatLM.from_pretrained("checkpoints/Qwen2.5-7B-Instruct", batch_size=16)  # doctest: +SKIP
        >>> lm.complete([ChatRequest.chat(user="Split into facts: ...", max_tokens=256)])[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str,
        id: str,  # noqa: A002 (the attribute every backend and the results JSON call id)
        batch_size: int = 8,
        cache: RequestCache | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of '{name}' has no chat template; use an instruction-tuned checkpoint "
                "(or set tokenizer.chat_template in its tokenizer_config.json)"
            )
        self.model, self.tokenizer, self.name, self.id = model.eval(), tokenizer, name, id
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        self.batch_size, self.cache, self.stats = batch_size, cache, ChatStats()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        batch_size: int = 8,
        cache: RequestCache | None = None,
        flag: str = "the chat model",
    ) -> HFChatLM:
        """Load a local checkpoint directory (bf16 on CUDA, fp32 on the CPU unless ``dtype``); ``flag`` names the
        option that gave ``path`` in the error when it is not a checkpoint."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from muffin.family import resolve_dtype

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{flag} '{path}' is not a local checkpoint directory with config.json; download the model first "
                "(the hub is not used here)"
            )
        device = resolve_device(device)
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype)
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        if not getattr(tok, "chat_template", None):  # checked before the weights are loaded
            raise ValueError(
                f"the tokenizer of {flag} '{path}' has no chat template; use an instruction-tuned checkpoint "
                "(or set tokenizer.chat_template in its tokenizer_config.json)"
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        logger.info("loaded chat model %s (%s, %s)", path, dtype, device)
        lm_id = f"hf:{path.resolve().name}:{checkpoint_fingerprint(path)}"
        return cls(model, tok, name=path.name, id=lm_id, batch_size=batch_size, cache=cache)

    def identity(self) -> dict[str, Any]:
        from utils.fingerprint import family_identity

        return family_identity(self)  # path, weights digest, dtype of the loaded model

    def complete(
        self, requests: Sequence[ChatRequest], *, batch_size: int | None = None, progress: bool = False
    ) -> list[ChatResponse]:
        size = batch_size or self.batch_size

        def call(reqs: list[ChatRequest], done: Callable[[int, ChatResponse], None]) -> list[ChatResponse]:
            out: list[ChatResponse | None] = [None] * len(reqs)
            # batch only requests that decode the same way; keep the input order in the output
            groups: dict[tuple[float, int, int], list[int]] = {}
            for i, r in enumerate(reqs):
                groups.setdefault((r.temperature, r.max_tokens, r.attempt), []).append(i)
            batches = [idx[s : s + size] for idx in groups.values() for s in range(0, len(idx), size)]
            for idx in tqdm(batches, desc=f"chat {self.name}", disable=not progress):
                for i, resp in zip(idx, self._generate([reqs[i] for i in idx])):
                    out[i] = resp
                    done(i, resp)
            return out  # type: ignore[return-value]

        return cached_complete(requests, lm_id=self.id, cache=self.cache, stats=self.stats, call=call)

    def render(self, req: ChatRequest) -> str:
        return self.tokenizer.apply_chat_template(req.openai_messages(), tokenize=False, add_generation_prompt=True)

    def _generate(self, reqs: list[ChatRequest]) -> list[ChatResponse]:
        """One batch of requests with the same decoding; a prompt over the context is an error response."""
        texts = [self.render(q) for q in reqs]
        # the rendered template already holds the BOS token: do not add a second one
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        out: list[ChatResponse | None] = [None] * len(reqs)
        keep = []
        for i, n in enumerate(lengths):
            if self.max_length is not None and n + reqs[i].max_tokens > self.max_length:
                self.stats.add(errors=1)
                out[i] = ChatResponse(
                    None,
                    error=f"prompt of {n} tokens + {reqs[i].max_tokens} new tokens exceeds the model's context of "
                    f"{self.max_length}; use a model with a longer context or a shorter prompt (--prompt-file)",
                )
            else:
                keep.append(i)
        if keep:
            for i, resp in zip(keep, self._run([texts[i] for i in keep], reqs[keep[0]])):
                out[i] = resp
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _run(self, texts: list[str], req: ChatRequest) -> list[ChatResponse]:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        asked = req.temperature if req.temperature >= GREEDY_BELOW else 0.0
        temperature = asked if asked > 0 else (REASK_TEMPERATURE if req.attempt else 0.0)
        kwargs: dict[str, Any] = {"max_new_tokens": req.max_tokens, "pad_token_id": tok.pad_token_id}
        kwargs["eos_token_id"] = self.stop_ids or None
        if temperature > 0:
            torch.manual_seed(int(hashlib.sha256(json.dumps(req.attempt).encode()).hexdigest()[:8], 16))
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False)
        self.stats.add(calls=len(texts))
        ids = self.model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]  # (B, T_new)
        stops = torch.tensor(self.stop_ids, dtype=torch.long, device=ids.device)
        out = []
        for row, mask in zip(ids, batch["attention_mask"]):
            ends = torch.isin(row, stops).nonzero()
            n_new = int(ends[0, 0]) + 1 if len(ends) else len(row)  # up to and with the first stop token
            text = tok.decode(row[:n_new], skip_special_tokens=True)
            pt = int(mask.sum())
            self.stats.add(prompt_tokens=pt, completion_tokens=n_new)
            out.append(ChatResponse(text, prompt_tokens=pt, completion_tokens=n_new))
        return out


# A Llama-3-style template (the released split / change-question models are Llama-3-8B fine-tunes).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_chat_lm(path: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny random Llama chat model (BPE tokenizer with a Llama-3-style chat template) at ``path``, for CPU
    tests and dry runs. Its output is random text, which exercises the stages' "unparseable output" path."""
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
