"""The model-family interface and the registry that picks a family from a checkpoint's ``config.json``.

Every consumer (trainer, feedback pipeline, evaluators, chat) talks to a model only through ``ModelFamily``;
family-specific code lives in the family's own package (``llava/``, ``omnilmm/``, ...).
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from PIL import Image

from muffin.decoding import Decoding
from utils.cuda import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One (image, question[, answer]) triple; ``image`` may be None for a text-only sample (the generic ``hf_vlm``
    family also takes a list of images for models that accept several)."""

    image: Image.Image | list[Image.Image] | None
    question: str
    answer: str | None = None


@runtime_checkable
class ModelFamily(Protocol):
    """What the trainer, the pipeline, the evaluators and the chat API need from a model family.

    A family wraps a loaded ``model`` (a ``torch.nn.Module``, usually a ``PreTrainedModel``), its tokenizer and
    its image preprocessing. Generic logic (batched generation with per-sample seeds, answer log-probs, yes/no
    probabilities) is written once in ``muffin.inference`` on top of these methods.
    """

    name: ClassVar[str]
    chat_decoding: ClassVar[Decoding]  # the paper's decoding for chat and benchmark answers
    model: torch.nn.Module
    tokenizer: Any

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora_path: str | Path | None = None,
        **kwargs: Any,
    ) -> ModelFamily:
        """Load weights, tokenizer and image processor (optionally merging a LoRA adapter)."""
        ...

    def encode(self, samples: Sequence[Sample], *, for_generation: bool = False) -> dict[str, torch.Tensor]:
        """Tokenise a batch with the family's chat template and preprocess its images.

        ``for_generation=False``: prompt + answer + end-of-turn token, right padded; the batch carries
        ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``answer_mask`` (B, T, bool: the answer tokens plus
        the end-of-turn token), plus the model's vision inputs. ``for_generation=True``: the prompt up to the
        assistant header only, LEFT padded, no ``answer_mask``. Tensors are returned on the CPU (so encoding can
        run in DataLoader workers); ``forward`` and ``generate_ids`` move them to the model's device and dtype.
        A prompt longer than the model's context raises ``ValueError`` naming the sample and the limit; an answer
        that overflows ``max_length`` is cut at its tail (never the prompt or image tokens) and families that do so
        mark it in an optional ``truncated`` (B,) bool tensor.
        """
        ...

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, T, V) aligned with ``batch["input_ids"]`` (one position per input token); differentiable."""
        ...

    def generate_ids(self, batch: dict[str, torch.Tensor], **generate_kwargs: Any) -> torch.Tensor:
        """New token ids (B, T_new) for a ``for_generation`` batch; kwargs go to ``model.generate``."""
        ...

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Text of generated ids, special tokens and the end-of-turn marker stripped."""
        ...

    def lora_target_modules(self) -> list[str]:
        """Names (regex or suffixes, as peft takes them) of the LM's linear layers that LoRA adapts."""
        ...

    def trainable_modules(self) -> list[str]:
        """Module-name prefixes trained fully next to LoRA (the projector / resampler)."""
        ...

    def frozen_modules(self) -> list[str]:
        """Module-name prefixes frozen by default in training (the vision tower)."""
        ...

    def save_pretrained(self, path: str | Path) -> None:
        """Save model, tokenizer and processor so that ``from_pretrained(path)`` loads them back."""
        ...


# name -> "module:Class"; imported lazily so an optional dependency loads only when its family is used.
FAMILIES: dict[str, str] = {
    "llava": "llava.family:LlavaFamily",
    "omnilmm": "omnilmm.family:OmniLMMFamily",
    "minicpmv": "omnilmm.minicpmv:MiniCPMVFamily",
    "hf_vlm": "muffin.hf_vlm:HFVisionLanguageFamily",
}

# config.json `model_type` -> family name
MODEL_TYPES: dict[str, str] = {
    "llava": "llava",
    "llava_llama": "llava",
    "omnilmm": "omnilmm",
    "minicpmv": "minicpmv",
}


def known_families() -> list[str]:
    return sorted(FAMILIES)


def read_config(path: str | Path) -> dict[str, Any]:
    """Read ``config.json`` of a local checkpoint directory, with an error that names the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint '{path}' does not exist. Pass a local directory that holds config.json "
            "(download hub checkpoints first, e.g. `huggingface-cli download openbmb/RLAIF-V-7B --local-dir ...`)."
        )
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(
            f"checkpoint directory '{path}' has no config.json. Point --model-path at the directory that "
            "holds config.json and the weights (for a LoRA adapter, pass the base model and the adapter separately)."
        )
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON ({e}); the checkpoint is corrupt or incomplete.") from e


def _hf_image_text_to_text(config: dict[str, Any]) -> bool:
    """True when transformers ships an image-text-to-text model for this config's `model_type`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def detect_family(path: str | Path) -> str:
    """Family name of a checkpoint, read from its ``config.json`` (``model_type`` / ``architectures``).

    Never guessed from the path: a directory named ``llava-something`` holding a Qwen2.5-VL is a Qwen2.5-VL.
    """
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    archs = config.get("architectures") or []
    if any("OmniLMM" in a for a in archs):
        return "omnilmm"
    if any("MiniCPMV" in a for a in archs):
        return "minicpmv"
    if _hf_image_text_to_text(config):
        return "hf_vlm"
    supported = sorted(MODEL_TYPES) + ["<any transformers image-text-to-text model_type>"]
    raise ValueError(
        f"unknown model family for checkpoint '{path}': model_type={model_type!r}, architectures={archs}. "
        f"Known families: {', '.join(known_families())}; supported model_type values: {', '.join(supported)}."
    )


def family_class(name: str) -> type:
    """Import a family class by its registry name, with a 'did you mean' error for typos."""
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model family '{name}'.{hint} Available: {', '.join(known_families())}.")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_family(
    path: str | Path,
    *,
    family: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    lora_path: str | Path | None = None,
    **kwargs: Any,
) -> ModelFamily:
    """Load any supported checkpoint through its family.

    Args:
        path: local checkpoint directory (with ``config.json``).
        family: force a family (``known_families()``); by default read from ``config.json``.
        dtype: torch dtype or its name; default bf16 on a GPU, float32 on the CPU.
        device: default ``cuda`` when available, else ``cpu``.
        lora_path: a LoRA adapter directory to merge at load.

    Example:
        >>> fam = load_family("checkpoints/RLAIF-V-7B")  # doctest: +SKIP
    """
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    if str(device).startswith("cuda"):
        from utils.cuda import configure_attention_backends

        configure_attention_backends()
    name = family or detect_family(path)
    cls = family_class(name)
    logger.info("loading %s as family '%s' (%s, %s)", path, name, dtype, device)
    return cls.from_pretrained(path, dtype=dtype, device=device, lora_path=lora_path, **kwargs)


def resolve_dtype(name: str) -> torch.dtype:
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if name not in table:
        raise ValueError(f"unknown dtype '{name}'. Available: {', '.join(table)}.")
    return table[name]
