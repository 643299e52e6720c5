"""``OmniLMMFamily``: OmniLMM 12B / RLAIF-V 12B behind the model-family interface (``muffin.family.ModelFamily``).

One class serves as chat model, candidate sampler, labeler (``muffin.inference.yes_no_probs``) and DPO policy
(full or LoRA). Prompts follow RLAIF-V's ``omni_preprocess``: the tokenizer's Zephyr chat template, our system
prompt inserted, the image written as ``<im_start>`` + ``num_query`` x ``<im_patch>`` + ``<im_end>`` + ``"\\n"``
before the question; training labels are the assistant turn plus its ``</s>``.

Example:
    >>> from muffin import load_family, Sample                     # doctest: +SKIP
    >>> fam = load_family("checkpoints/RLAIF-V-12B")               # doctest: +SKIP
    >>> from muffin.inference import generate                      # doctest: +SKIP
    >>> generate(fam, [Sample(img, "Describe the image.")], fam.chat_decoding)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from muffin.decoding import OMNILMM_CHAT, Decoding
from muffin.family import FastPath, Sample, checkpoint_format, read_config
from muffin.fast.attention import attention_mask_for
from muffin.fast.generation import generate_new_ids
from muffin.weights import check_loading_info, check_transformers_checkpoint
from omnilmm.config import IM_END, IM_PATCH, IM_START, OMNILMM_SYSTEM, ZEPHYR_CHAT_TEMPLATE, OmniLMMConfig
from omnilmm.modeling import OmniLMMForCausalLM
from omnilmm.vision import OmniLMMImageTransform
from utils.cuda import to_device
from utils.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class OmniLMMFamily:
    """OmniLMM 12B (``openbmb/OmniLMM-12B``, ``openbmb/RLAIF-V-12B``) and any checkpoint of that architecture."""

    name: ClassVar[str] = "omnilmm"
    chat_decoding: ClassVar[Decoding] = OMNILMM_CHAT  # beam sampling, 3 beams, T 0.6, top_k 30, top_p 0.9, rep 1.1

    def __init__(
        self, model: OmniLMMForCausalLM, tokenizer: Any, *, system: str = OMNILMM_SYSTEM, max_length: int | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # shared-prefix packing (the hooks below) and one prefill per repeated prompt (generate_ids' repeats)
        self.fast = FastPath(packing=True, shares_generation_prefix=True)
        self.system = system
        cfg = model.config
        cfg.validate_multimodal("OmniLMM config")
        ids = tokenizer.convert_tokens_to_ids([IM_START, IM_END, IM_PATCH])
        missing = [t for t, i in zip((IM_START, IM_END, IM_PATCH), ids) if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(
                f"the tokenizer has no {missing} token(s); an OmniLMM tokenizer must hold <im_start>, "
                "<im_end> and <im_patch> (load the tokenizer saved with the checkpoint)"
            )
        cfg.im_start_token_id, cfg.im_end_token_id, cfg.im_patch_token_id = ids
        if getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
        self.image_span = IM_START + IM_PATCH * cfg.num_query + IM_END
        self.transform = OmniLMMImageTransform(cfg.image_size)
        self.max_length = max_length or cfg.max_position_embeddings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora_path: str | Path | None = None,
        **kwargs: Any,
    ) -> OmniLMMFamily:
        """Load a checkpoint in the published layout; merge the peft LoRA adapter at ``lora_path`` if given.

        Raises ``KeyError`` naming the keys when the weights do not match the architecture.
        """
        path = Path(path)
        fmt = checkpoint_format(read_config(path), path)
        if fmt.family != cls.name:
            raise ValueError(f"{path} is a {fmt.layout} checkpoint, not OmniLMM; load it with family '{fmt.family}'")
        config = OmniLMMConfig.from_pretrained(path)
        config.validate_multimodal(f"{path}/config.json")
        hint = " Check num_query, image_size and the vision tower fields of the config."
        with torch.device("meta"):  # the files are checked against the model before any memory is used
            meta = OmniLMMForCausalLM(config)
        check_transformers_checkpoint(meta, path, hint=hint)
        model, info = OmniLMMForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        check_loading_info(info, str(path), hint=hint)
        tokenizer = load_tokenizer(path)
        if lora_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(lora_path)).merge_and_unload()
        model.to(device).eval()
        return cls(model, tokenizer, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Save model (published key layout) and tokenizer; ``from_pretrained(path)`` loads them back."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ------------------------------------------------------------------ encoding
    def _messages(self, i: int, s: Sample) -> list[dict[str, str]]:
        if not isinstance(s.question, str) or not s.question.strip():
            raise ValueError(f"sample {i}: empty question; every sample needs a non-empty 'question' string")
        question = s.question
        if s.image is not None:  # the original puts the span where "<image>" is, else before the question
            question = (
                question.replace("<image>", self.image_span, 1)
                if "<image>" in question
                else f"{self.image_span}\n{question}"
            )
        elif IM_PATCH in question or IM_START in question:
            raise ValueError(f"sample {i}: the question contains image tokens but the sample has no image")
        return [{"role": "system", "content": self.system}, {"role": "user", "content": question}]

    def _encode_one(self, i: int, s: Sample, for_generation: bool) -> tuple[list[int], list[bool]]:
        messages = self._messages(i, s)
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if for_generation:
            ids = self.tokenizer(prompt)["input_ids"]
            if len(ids) >= self.max_length:
                raise ValueError(
                    f"sample {i}: the prompt is {len(ids)} tokens, over the model's context of "
                    f"{self.max_length}; shorten the question"
                )
            return ids, [False] * len(ids)
        if s.answer is None:
            raise ValueError(f"sample {i}: no answer to encode; pass for_generation=True to encode the prompt only")
        # As RLAIF-V's omni_preprocess: render the whole chat, strip the trailing newline, tokenise in one pass;
        # the answer tokens (and the closing </s>) are those that end after the prompt's last character.
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": s.answer}], tokenize=False
        ).strip()
        if not full.startswith(prompt):
            raise ValueError(
                f"sample {i}: the chat template renders the answer turn differently from the "
                "generation prompt; use a Zephyr-style template"
            )
        enc = self.tokenizer(full, return_offsets_mapping=True)
        ids = enc["input_ids"]
        is_answer = [end > len(prompt) for _start, end in enc["offset_mapping"]]
        if not any(is_answer):
            raise ValueError(f"sample {i}: the answer {s.answer!r} produced no tokens")
        n_prompt = is_answer.index(True)
        if n_prompt >= self.max_length:
            raise ValueError(
                f"sample {i}: the prompt is {n_prompt} tokens, over max_length {self.max_length}; shorten the question"
            )
        return ids[: self.max_length], is_answer[: self.max_length]  # cut the answer's tail, never the prompt

    def encode(self, samples: Sequence[Sample], *, for_generation: bool = False) -> dict[str, torch.Tensor]:
        """See ``ModelFamily.encode``; ``pixel_values`` (N_images, 3, S, S) holds the images in sample order."""
        if not samples:
            raise ValueError("encode() got no samples")
        rows = [self._encode_one(i, s, for_generation) for i, s in enumerate(samples)]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        ans = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (row, mask) in enumerate(rows):
            sl = slice(width - len(row), width) if for_generation else slice(0, len(row))  # left pad to generate
            ids[b, sl] = torch.tensor(row)
            attn[b, sl] = 1
            ans[b, sl] = torch.tensor(mask)
        batch = {"input_ids": ids, "attention_mask": attn}
        if not for_generation:
            batch["answer_mask"] = ans
        images = [s.image for s in samples if s.image is not None]
        if images:
            batch["pixel_values"] = self.transform.batch(images)
        return batch

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device
        out = {k: to_device(batch[k], dev) for k in ("input_ids", "attention_mask")}
        if "pixel_values" in batch:
            vision_dtype = self.model.model.vision_tower.patch_embed.proj.weight.dtype
            out["pixel_values"] = to_device(batch["pixel_values"], dev).to(vision_dtype)
        return out

    def forward(self, batch: dict[str, torch.Tensor], *, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits (B, T, V); positions follow the attention mask so left padding does not shift them."""
        inputs = self._inputs(batch)
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return (self.model if model is None else model)(**inputs, use_cache=False).logits

    def generate_ids(
        self, batch: dict[str, torch.Tensor], *, repeats: Sequence[int] | None = None, **generate_kwargs: Any
    ) -> torch.Tensor:
        """New ids; ``repeats``: each row sampled that many times from one prefill (``muffin.fast.generation``)."""
        generate_kwargs = {"pad_token_id": self.pad_id, "eos_token_id": self.tokenizer.eos_token_id, **generate_kwargs}
        return generate_new_ids(self.model, self._inputs(batch), repeats=repeats, **generate_kwargs)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ shared-prefix fast path (muffin.fast.packing)
    def _core(self) -> Any:
        """The OmniLMM model under any wrapper (peft's PeftModel keeps LoRA layers active in it)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def image_token_id(self) -> int:
        return self._core().config.im_patch_token_id

    def image_features(self, batch: dict[str, torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor | None]:
        """Resampled features (num_query * images, H) of each listed row's images (None for a text-only row)."""
        start_id = self._core().config.im_start_token_id
        n_images = (batch["input_ids"] == start_id).sum(-1).tolist()  # images per row, in reading order
        first = [sum(n_images[:r]) for r in range(len(n_images))]
        keep = [i for r in rows for i in range(first[r], first[r] + n_images[r])]
        if not keep:
            return [None] * len(rows)
        pixels = self._inputs({**batch, "pixel_values": batch["pixel_values"][keep]})["pixel_values"]
        feats = iter(self._core().model.image_features(pixels))  # (n, Q, H)
        return [torch.cat([next(feats) for _ in range(n_images[r])]) if n_images[r] else None for r in rows]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._core().model.embed_tokens(input_ids)

    def decoder_hidden(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        body = self._core().model
        mask = attention_mask_for(attention_mask, inputs_embeds, body.config._attn_implementation)
        # MistralModel.forward directly: OmniLMMForCausalLM.forward would try to splice images again
        return body(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def output_head(self) -> torch.nn.Linear:
        return self._core().lm_head

    # ------------------------------------------------------------------ training hooks
    def lora_target_modules(self) -> list[str]:
        """Every nn.Linear of the Mistral decoder layers (not the vision tower, the resampler or lm_head)."""
        return [
            n
            for n, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
        ]

    def trainable_modules(self) -> list[str]:
        return ["model.resampler"]

    def frozen_modules(self) -> list[str]:
        return ["model.vision_tower"]
