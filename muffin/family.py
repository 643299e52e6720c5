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


PACKED_ATTENTION = ("auto", "flex", "varlen", "dense")
COMPILE_LAYERS = ("auto", True, False)


@dataclass
class FastPath:
    """The speed options of a loaded family (``muffin/fast``): the family sets what its model supports in
    ``__init__``; a caller (a benchmark, a test) may change a field of ``family.fast`` to force a path. Every path
    gives the same numbers up to rounding.

    Attributes:
        packing: pack rows that share image and prompt behind one copy of them (needs ``SharedPrefixModel``);
            False runs every row as its own sequence.
        packed_attention: attention of the packed rows (``PACKED_ATTENTION``): "auto" lays the groups end to end in
            one flat row on CUDA and picks FlashAttention varlen or FlexAttention by the answers' length; "varlen"
            and "flex" force one; "dense" keeps a row per group with a dense mask.
        compile_layers: run the decoder layers compiled on the flat row (``COMPILE_LAYERS``; "auto": on CUDA for an
            LM at least ``muffin.fast.compiled_layers.COMPILE_MIN_HIDDEN`` wide; needs ``LayeredModel``).
        shares_generation_prefix: ``generate_ids`` takes ``repeats`` (a prompt sampled n times prefilled once).
    """

    packing: bool = False
    packed_attention: str = "auto"
    compile_layers: bool | str = "auto"
    shares_generation_prefix: bool = False


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
    pad_id: int  # the padding token of ``encode``'s batches
    fast: FastPath  # what the fast path may do for this model (muffin/fast)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (``forward`` and ``generate_ids`` move batches there)."""
        ...

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

    def forward(self, batch: dict[str, torch.Tensor], *, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits (B, T, V) aligned with ``batch["input_ids"]`` (one position per input token); differentiable.
        ``model``: what to call instead of ``self.model`` (in training, the launcher's wrapper of it, whose forward
        hooks synchronise gradients across ranks)."""
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


@runtime_checkable
class SharedPrefixModel(Protocol):
    """Hooks a family exposes for the shared-prefix fast path (``muffin.fast.packing``): a group's image and prompt
    encoded once, its answers or questions packed behind them."""

    image_token_id: int

    def image_features(self, batch: dict[str, torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor | None]:
        """Features (n_image_tokens, H) replacing the image tokens of each listed row of an ``encode`` batch."""
        ...

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, H) of the language model."""
        ...

    def decoder_hidden(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Last hidden states (B, L, H) of the LM body for a 4D boolean mask (B, 1, L, L), True = attend."""
        ...

    def output_head(self) -> torch.nn.Linear:
        """The LM's output projection (``lm_head``)."""
        ...


@runtime_checkable
class LayeredModel(Protocol):
    """A family that lists its LM's decoder layers: they can be compiled on the packed row
    (``muffin.fast.compiled_layers``) and left out of gradient checkpointing (``--checkpoint_layers``)."""

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The LM's decoder layers, in order."""
        ...


# name -> "module:Class"; imported lazily so an optional dependency loads only when its family is used.
FAMILIES: dict[str, str] = {
    "llava": "llava.family:LlavaFamily",
    "omnilmm": "omnilmm.family:OmniLMMFamily",
    "minicpmv": "omnilmm.minicpmv:MiniCPMVFamily",
    "hf_vlm": "muffin.hf_vlm.family:HFVisionLanguageFamily",
}


# families whose checkpoints may ship Python code that ``trust_remote_code=True`` runs instead of ours
REMOTE_CODE_FAMILIES: frozenset[str] = frozenset({"minicpmv"})
TRUST_REMOTE_CODE_HELP = (
    "run the Python code shipped with the checkpoint (MiniCPM-Llama3-V 2.5's own modeling code) instead of this "
    "project's implementation of it; off by default: read that code before turning this on"
)


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


@dataclass(frozen=True)
class CheckpointFormat:
    """What a ``config.json`` is: the family that loads it and the on-disk layout within that family."""

    family: str  # a key of FAMILIES
    layout: str  # see LAYOUTS


LAYOUTS: dict[str, str] = {
    "llava-original": "LLaVA repo format (LlavaLlamaForCausalLM: liuhaotian/llava-v1.5-7b, openbmb/RLAIF-V-7B)",
    "llava-hf": "transformers' LlavaForConditionalGeneration (llava-hf/llava-1.5-7b-hf)",
    "omnilmm": "OmniLMMForCausalLM (openbmb/OmniLMM-12B, openbmb/RLAIF-V-12B)",
    "minicpmv": "MiniCPMV (openbmb/MiniCPM-Llama3-V-2_5)",
    "hf_vlm": "a transformers image-text-to-text model (Qwen2.5-VL, LLaVA-NeXT, Idefics3, SmolVLM, Gemma 3)",
}


def _transformers_vlm_class(model_type: str | None) -> str | None:
    """The image-text-to-text class transformers ships for ``model_type`` (None when it ships none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type) if model_type else None


def minicpmv_format(config: dict[str, Any]) -> CheckpointFormat:
    """Hook for the MiniCPM-V family: which loader a ``minicpmv`` config goes to (one family for now)."""
    return CheckpointFormat("minicpmv", "minicpmv")


class UnsupportedCheckpoint(ValueError):
    """A config.json that matches no loader exactly."""


def checkpoint_format(config: dict[str, Any], where: str | Path = "config.json") -> CheckpointFormat:
    """The family and layout of a checkpoint, read from ``model_type`` AND ``architectures`` of its config.

    Each rule matches exactly; a config matching none is refused (``UnsupportedCheckpoint``) rather than handed to
    a loader that would fill the gaps with default sizes. The original LLaVA format is recognised by its
    architecture under either model_type (liuhaotian/llava-v1.5-7b writes ``"llava"``, later checkpoints
    ``"llava_llama"``); llava-hf's ``"llava"`` needs its ``text_config`` and ``vision_config``.
    """
    mt = config.get("model_type")
    archs = list(config.get("architectures") or [])

    def refuse(why: str) -> UnsupportedCheckpoint:
        return UnsupportedCheckpoint(
            f"unknown model family for checkpoint '{where}': model_type={mt!r}, architectures={archs}: {why}. "
            f"Known families: {', '.join(known_families())}; supported layouts: "
            + "; ".join(f"{k} = {v}" for k, v in LAYOUTS.items())
        )

    if "LlavaLlamaForCausalLM" in archs or (mt == "llava_llama" and not archs):
        if mt not in ("llava", "llava_llama") or len(archs) > 1:
            raise refuse(
                "LlavaLlamaForCausalLM is the original LLaVA format, whose model_type is llava or llava_llama"
            )
        return CheckpointFormat("llava", "llava-original")
    if mt == "llava_llama":
        raise refuse("model_type llava_llama needs architectures ['LlavaLlamaForCausalLM']")
    if mt == "llava":
        if archs and archs != ["LlavaForConditionalGeneration"]:
            raise refuse(
                "model_type llava is either LlavaLlamaForCausalLM (original) or LlavaForConditionalGeneration"
            )
        missing = [k for k in ("text_config", "vision_config") if not isinstance(config.get(k), dict)]
        if missing:
            raise refuse(
                f"a llava-hf config needs {missing} (without them transformers would build default sizes); "
                "an original LLaVA config names architectures ['LlavaLlamaForCausalLM']"
            )
        return CheckpointFormat("llava", "llava-hf")
    if mt == "omnilmm" or "OmniLMMForCausalLM" in archs:
        if mt != "omnilmm" or archs not in ([], ["OmniLMMForCausalLM"]):
            raise refuse("OmniLMM checkpoints have model_type omnilmm and architectures ['OmniLMMForCausalLM']")
        return CheckpointFormat("omnilmm", "omnilmm")
    if mt == "minicpmv" or any("MiniCPMV" in a for a in archs):
        return minicpmv_format(config)
    cls = _transformers_vlm_class(mt)
    if cls is not None:
        if archs and archs != [cls]:
            raise refuse(f"transformers' image-text-to-text class for model_type {mt!r} is {cls}")
        return CheckpointFormat("hf_vlm", "hf_vlm")
    raise refuse("no loader reads this model_type / architectures pair")


def detect_family(path: str | Path) -> str:
    """Family name of a checkpoint, read from its ``config.json`` (``model_type`` and ``architectures``).

    Never guessed from the path: a directory named ``llava-something`` holding a Qwen2.5-VL is a Qwen2.5-VL.
    """
    return checkpoint_format(read_config(path), path).family


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
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> ModelFamily:
    """Load any supported checkpoint through its family.

    Args:
        path: local checkpoint directory (with ``config.json``).
        family: force a family (``known_families()``); by default read from ``config.json``.
        dtype: torch dtype or its name; default bf16 on a GPU, float32 on the CPU.
        device: default ``cuda`` when available, else ``cpu``.
        lora_path: a LoRA adapter directory to merge at load.
        trust_remote_code: run the Python code shipped with the checkpoint (``REMOTE_CODE_FAMILIES`` only; other
            families have no such code and ignore it with a warning). Off by default.

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
    # --- remote code (issue 32): opt-in, and only a family that can run a checkpoint's own code gets the flag
    if trust_remote_code and name in REMOTE_CODE_FAMILIES:
        kwargs["trust_remote_code"] = True
    elif trust_remote_code:
        logger.warning("%s: family '%s' runs no code shipped with checkpoints; trust_remote_code ignored", path, name)
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
