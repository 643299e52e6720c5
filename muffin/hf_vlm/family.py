"""A model family for any transformers image-text-to-text VLM (Qwen2.5-VL, LLaVA-NeXT, Idefics3, SmolVLM, Gemma 3).

Built on ``AutoModelForImageTextToText`` + ``AutoProcessor``: the checkpoint's own processor expands image tokens
(dynamic resolution, tiling) and its own chat template lays out the turns. The answer mask is derived from that
template by rendering the conversation with and without the assistant turn, so no per-model table is needed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from muffin.decoding import Decoding
from muffin.family import FastPath, Sample, checkpoint_format, read_config
from muffin.weights import check_loading_info, check_transformers_checkpoint
from utils.cuda import to_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedText:
    """One sample's chat-template text, its images, and how many tokens at its end are answer + end-of-turn."""

    text: str
    images: list[Image.Image]
    answer_tokens: int  # 0 for a generation prompt


def sample_images(sample: Sample, index: int) -> list[Image.Image]:
    """The sample's images as a list (``image`` may be None, one PIL image, or a list of them), converted to RGB."""
    raw = sample.image
    items = [] if raw is None else list(raw) if isinstance(raw, (list, tuple)) else [raw]
    for k, im in enumerate(items):
        if not isinstance(im, Image.Image):
            got = type(im).__name__
            raise TypeError(
                f"sample {index}, field 'image'[{k}]: a {got}, not a PIL image; use utils.images.load_image"
            )
    return [im if im.mode == "RGB" else im.convert("RGB") for im in items]


def chat_messages(question: str, n_images: int, answer: str | None = None) -> list[dict[str, Any]]:
    """The conversation in the structured-content format every processor chat template understands."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class HFVisionLanguageFamily:
    """``ModelFamily`` for any model that ``AutoModelForImageTextToText`` loads.

    Example:
        >>> fam = HFVisionLanguageFamily.from_pretrained("checkpoints/Qwen2.5-VL-7B-Instruct")  # doctest: +SKIP
        >>> generate(fam, [Sample(img, "Describe the image.")], fam.chat_decoding)  # doctest: +SKIP
    """

    name: ClassVar[str] = "hf_vlm"
    # Greedy, a deterministic family-neutral default (the 3-beam preset is LLaVA 1.5's paper setting); pass
    # another Decoding to generate() for a checkpoint's own recommendation.
    chat_decoding: ClassVar[Decoding] = Decoding(max_new_tokens=1024)

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        template = getattr(processor, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the checkpoint's default one
            template = template.get("default")
        if not template:
            raise ValueError(
                f"the processor of {type(model).__name__} has no chat template; save one with the "
                "checkpoint (processor.chat_template = ...; processor.save_pretrained(path))"
            )
        self._template: str = template
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id: int = self.tokenizer.pad_token_id
        self._eot_warned = False
        self._parts = _model_parts(model)
        # What model.forward takes by name: batches may carry more (the trainer's rows / ref log-probs).
        self._input_names = frozenset(inspect.signature(type(model).forward).parameters) - {"self", "kwargs"}
        # M-RoPE models (Qwen2-VL family) derive their 3D positions from the mask themselves; for the others,
        # positions from the mask make a left-padded row see what it sees alone.
        self._positions_from_mask = not hasattr(getattr(model, "model", model), "get_rope_index")
        text_config = model.config.get_text_config()
        self.image_token_id: int = model.config.image_token_id
        # The shared-prefix fast path (muffin.fast.packing) packs rows with 1D positions and a causal block mask, so it
        # is exact only for LMs with 1D RoPE and causal attention everywhere: not M-RoPE (Qwen2-VL family), not
        # bidirectional attention over image tokens (token_type_ids: Gemma 3), not hybrid sliding-window layers.
        self.fast = FastPath(
            packing=(
                self._positions_from_mask
                and "token_type_ids" not in self._input_names
                and "sliding_attention" not in (getattr(text_config, "layer_types", None) or ())
            )
        )

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora_path: str | Path | None = None,
        **kwargs: Any,
    ) -> HFVisionLanguageFamily:
        """Load the model, processor and tokenizer from ``path``; merge the LoRA adapter at ``lora_path`` if given.

        Extra ``kwargs`` go to ``AutoModelForImageTextToText.from_pretrained`` (e.g. ``attn_implementation``).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        fmt = checkpoint_format(read_config(path), path)
        if fmt.family != cls.name:
            raise ValueError(f"{path} is a {fmt.layout} checkpoint; load it with family '{fmt.family}'")
        check_transformers_checkpoint(meta_model(path), path)  # before any memory is used
        processor = AutoProcessor.from_pretrained(path)
        model, info = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **kwargs
        )
        check_loading_info(info, str(path))
        if lora_path is not None:
            model = merge_lora(model, Path(lora_path))
        return cls(model.to(device).eval(), processor)

    def save_pretrained(self, path: str | Path) -> None:
        """Save model, processor (image processor, tokenizer, chat template) so ``from_pretrained`` reloads them."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    # ------------------------------------------------------------------ chat template -> text and answer span
    def _render(self, messages: list[dict[str, Any]], generation: bool) -> str:
        # The processor's template rendered by the tokenizer: the same Jinja with the same special-token variables,
        # without the processor's video defaults that some versions push into the processor kwargs (SmolVLM, 5.17).
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self._template, tokenize=False, add_generation_prompt=generation
        )

    def _add_special(self, text: str) -> bool:
        """Let the tokenizer add bos only when the template did not write it already (Gemma 3, Idefics3 do)."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def end_of_turn(self, turn_end: str) -> str:
        """The template's turn-closing marker when it is one token (``<|im_end|>``, ``<end_of_turn>``); else (nothing,
        or a non-token such as LLaVA-NeXT Mistral's ``<\\s>``) the eos token, which the model emits to stop."""
        marker = turn_end.strip()
        if marker and len(self.tokenizer(marker, add_special_tokens=False).input_ids) == 1:
            return marker
        if not self._eot_warned:
            logger.info("template ends the turn with %r, not a token: using eos %r", marker, self.tokenizer.eos_token)
            self._eot_warned = True
        return self.tokenizer.eos_token

    def encode_text(self, sample: Sample, index: int, *, for_generation: bool) -> EncodedText:
        """Render one sample with the chat template; count its answer + end-of-turn tokens."""
        images = sample_images(sample, index)
        prompt = self._render(chat_messages(sample.question, len(images)), generation=True)
        if for_generation:
            return EncodedText(prompt, images, 0)
        if sample.answer is None:
            raise ValueError(f"sample {index} has no answer; encode(for_generation=False) needs field 'answer'")
        full = self._render(chat_messages(sample.question, len(images), sample.answer), generation=False)
        answer = sample.answer.strip()
        if not full.startswith(prompt) or answer not in full[len(prompt) :]:
            raise ValueError(
                f"sample {index}: the chat template of {type(self.model).__name__} does not render the "
                "assistant turn as generation prompt + answer; this family needs such a template"
            )
        turn = full[len(prompt) :]
        cut = turn.index(answer) + len(answer)
        text = prompt + turn[:cut] + self.end_of_turn(turn[cut:])
        add = self._add_special(text)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=add).input_ids
        full_ids = self.tokenizer(text, add_special_tokens=add).input_ids
        # Image placeholders expand only in the processor, but they are special tokens before the answer, so the
        # answer's token count is unchanged. A token merged across the prompt/answer boundary counts as answer.
        common = 0
        while common < min(len(prompt_ids), len(full_ids)) and prompt_ids[common] == full_ids[common]:
            common += 1
        return EncodedText(text, images, len(full_ids) - common)

    # ------------------------------------------------------------------ ModelFamily
    def encode(self, samples: Sequence[Sample], *, for_generation: bool = False) -> dict[str, torch.Tensor]:
        """Batch of chat-template tokens and processor vision inputs (see ``ModelFamily.encode``)."""
        if not samples:
            raise ValueError("encode got an empty list of samples")
        enc = [self.encode_text(s, i, for_generation=for_generation) for i, s in enumerate(samples)]
        texts = [e.text for e in enc]
        add = self._add_special(texts[0])
        kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True, add_special_tokens=add)
        if any(e.images for e in enc):
            kwargs["images"] = [e.images for e in enc]  # nested per sample: every processor splits them per text
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left" if for_generation else "right"
        try:
            batch = dict(self.processor(**kwargs))
        finally:
            self.tokenizer.padding_side = side
        lengths = batch["attention_mask"].sum(-1)
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        for i, n in enumerate(lengths.tolist()):
            if limit is not None and n > limit:
                raise ValueError(
                    f"sample {i}: {n} tokens (question + images{'' if for_generation else ' + answer'})"
                    f" exceed the model's context of {limit}; shorten the question or the answer, or "
                    "lower the processor's image resolution (max_pixels / longest_edge)"
                )
        if not for_generation:
            positions = torch.arange(batch["input_ids"].shape[1])
            starts = lengths - torch.tensor([e.answer_tokens for e in enc])
            batch["answer_mask"] = (positions[None] >= starts[:, None]) & (positions[None] < lengths[:, None])
        return batch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to_model(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's own inputs of a batch, on its device; floating inputs (pixels) in its dtype."""
        device = self.device
        dtype = next(self.model.parameters()).dtype
        out = {}
        for k, v in batch.items():
            if k in self._input_names and torch.is_tensor(v):
                v = to_device(v, device)
                out[k] = v.to(dtype) if torch.is_floating_point(v) else v
        return out

    def forward(self, batch: dict[str, torch.Tensor], *, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits (B, T, V) in the model's dtype, aligned with ``batch["input_ids"]``; differentiable."""
        inputs = self._to_model(batch)
        if self._positions_from_mask:
            inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return (self.model if model is None else model)(**inputs, use_cache=False).logits

    def generate_ids(self, batch: dict[str, torch.Tensor], **generate_kwargs: Any) -> torch.Tensor:
        """New token ids (B, T_new) after a left-padded generation prompt."""
        inputs = self._to_model(batch)
        generate_kwargs.setdefault("pad_token_id", self.pad_id)
        out = self.model.generate(**inputs, **generate_kwargs)  # (B, T + T_new)
        return out[:, inputs["input_ids"].shape[1] :]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated text, special tokens (the end-of-turn and padding) removed, whitespace stripped."""
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ shared-prefix fast path (muffin.fast.packing)
    def image_features(self, batch: dict[str, torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor | None]:
        """The vision embeddings (n_image_tokens, H) the model scatters into each listed row (None: no image).

        Read at the LM's input: the base model runs its own vision tower, projector and merge (tiling, newline
        tokens, pixel shuffle) on every row of the batch (slicing pixels per row is model-specific), then stops.
        """
        ids = batch["input_ids"]
        if not bool((ids[list(rows)] == self.image_token_id).any()):
            return [None] * len(rows)
        embeds = self._lm_inputs(batch)  # (B, T, H)
        out: list[torch.Tensor | None] = []
        for r in rows:
            places = torch.nonzero(ids[r] == self.image_token_id).flatten()  # on the host: no wait for the GPU
            out.append(embeds[r][to_device(places, embeds.device)] if places.numel() else None)
        return out

    def _lm_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}

        def stop(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured["embeds"] = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0]
            raise _ReachedLanguageModel

        handle = self.model.get_decoder().register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.model(**self._to_model(batch), use_cache=False)
        except _ReachedLanguageModel:
            pass
        finally:
            handle.remove()
        return captured["embeds"]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, H) of the language model."""
        return self.model.get_input_embeddings()(input_ids)

    def decoder_hidden(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states (B, L, H) of the LM for a 4D boolean mask (B, 1, L, L), True = attend."""
        lm = self.model.get_decoder()
        window = getattr(lm.config, "sliding_window", None)
        if window is not None and int(position_ids.max()) >= window:
            raise ValueError(
                f"a packed row reaches position {int(position_ids.max())}, past the LM's sliding window "
                f"of {window}: the packed mask would not apply the window; set family.fast.packing = False"
            )
        if lm.config._attn_implementation == "eager":  # eager adds the mask: turn True/False into 0/-inf
            attention_mask = torch.zeros(
                attention_mask.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device
            ).masked_fill(~attention_mask, torch.finfo(inputs_embeds.dtype).min)
        return lm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def output_head(self) -> torch.nn.Linear:
        """The LM's output projection (``lm_head``)."""
        return self.model.get_output_embeddings()

    # ------------------------------------------------------------------ training hooks
    def lora_target_modules(self) -> list[str]:
        """Full names of every ``nn.Linear`` inside the language model (not the vision tower, projector, lm_head)."""
        return list(self._parts.lora_targets)

    def trainable_modules(self) -> list[str]:
        """The projector / connector modules, trained fully next to LoRA (LLaVA-NeXT's ``image_newline`` is a bare
        parameter, not a module: it trains in full fine-tuning and stays frozen under LoRA)."""
        return list(self._parts.projector)

    def frozen_modules(self) -> list[str]:
        """The vision tower (without a merger that lives inside it)."""
        return list(self._parts.vision)


def meta_model(path: str | Path) -> torch.nn.Module:
    """The model ``from_pretrained`` builds for the checkpoint at ``path``, on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))


class _ReachedLanguageModel(Exception):
    """Raised by a forward pre-hook to stop the base model once the LM's input embeddings are known."""


def merge_lora(model: torch.nn.Module, lora_path: Path) -> torch.nn.Module:
    """Merge a LoRA checkpoint of ``muffin.train`` into ``model``: peft's adapter, then the fully trained non-LoRA
    weights (projector) of ``non_lora_trainables.safetensors`` when present, keyed as in ``model.state_dict()``."""
    from peft import PeftModel
    from safetensors.torch import load_file

    if not (lora_path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"LoRA checkpoint '{lora_path}' has no adapter_config.json; pass a checkpoint dir")
    model = PeftModel.from_pretrained(model, str(lora_path)).merge_and_unload()
    extra_file = lora_path / "non_lora_trainables.safetensors"
    if extra_file.is_file():
        extra = load_file(str(extra_file))
        unknown = sorted(set(extra) - set(model.state_dict()))
        if unknown:
            raise ValueError(
                f"{extra_file}: {len(unknown)} weights are not in {type(model).__name__} (e.g. "
                f"'{unknown[0]}'); was the adapter trained on another base model?"
            )
        model.load_state_dict(extra, strict=False)
        logger.info("merged %s and %d non-LoRA weights from %s", lora_path.name, len(extra), extra_file.name)
    return model


@dataclass(frozen=True)
class ModelParts:
    """Qualified names of a VLM's language model, vision-tower pieces and projector pieces."""

    language_model: str
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    # read at load, before peft wraps each target in place (its base_layer / lora_A / lora_B are Linear too)
    lora_targets: tuple[str, ...]


def _model_parts(model: torch.nn.Module) -> ModelParts:
    """Find the LM (``get_decoder()``), the vision tower and the projector of a transformers VLM by structure.

    The LM is what ``get_decoder()`` returns; the vision tower is the base model's child whose name contains
    "vision" or "visual"; every other child module with parameters is the projector. A "merger" inside the tower
    (Qwen2-VL / Qwen2.5-VL) maps vision features into the LM: it trains like a projector, the rest stays frozen.
    """
    decoder = model.get_decoder()
    names = {id(m): n for n, m in model.named_modules()}
    if id(decoder) not in names or not names[id(decoder)]:
        raise ValueError(
            f"cannot locate the language model inside {type(model).__name__}; get_decoder() returned "
            "a module that is not a submodule of the model"
        )
    lm = names[id(decoder)]
    base_name = lm.rsplit(".", 1)[0] if "." in lm else ""
    base = model.get_submodule(base_name) if base_name else model
    prefix = f"{base_name}." if base_name else ""
    vision: list[str] = []
    projector: list[str] = []
    for child_name, child in base.named_children():
        full = prefix + child_name
        if full == lm or next(child.parameters(), None) is None:
            continue
        if "vision" in child_name or "visual" in child_name:
            subs = [n for n, sub in child.named_children() if next(sub.parameters(), None) is not None]
            if any("merger" in n for n in subs):
                for n in subs:
                    (projector if "merger" in n else vision).append(f"{full}.{n}")
            else:
                vision.append(full)
        else:
            projector.append(full)
    if not vision:
        raise ValueError(
            f"cannot locate the vision tower of {type(model).__name__}: no child of '{base_name}' is "
            "named like 'vision*' / 'visual'"
        )
    targets = tuple(n for n, m in model.named_modules() if n.startswith(lm + ".") and isinstance(m, torch.nn.Linear))
    return ModelParts(lm, tuple(vision), tuple(projector), targets)
