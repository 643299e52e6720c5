"""``LlavaFamily``: LLaVA 1.5 behind the model-family interface (``muffin.family.ModelFamily``).

The model is transformers' ``LlavaForConditionalGeneration``; this module adds the original llava_v1 template,
the pad preprocessing, and one loader for the llava-hf, original (``llava_llama``) and LoRA checkpoint formats.

Example:
    >>> from muffin import load_family, Sample                      # doctest: +SKIP
    >>> fam = load_family("checkpoints/RLAIF-V-7B")                 # doctest: +SKIP
    >>> from muffin.inference import generate                       # doctest: +SKIP
    >>> generate(fam, [Sample(img, "Describe the image.")], fam.chat_decoding)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

from llava import convert
from llava.preprocess import make_image_processor, preprocess
from llava.template import SYSTEM, render_prompt
from muffin.decoding import BEAM3_GREEDY, Decoding
from muffin.family import FastPath, Sample, checkpoint_format, read_config
from muffin.fast.attention import attention_mask_for
from muffin.fast.generation import generate_new_ids
from muffin.weights import (
    check_coverage,
    check_loading_info,
    check_transformers_checkpoint,
    drop_known_buffers,
    model_tensors,
)
from utils.cuda import to_device
from utils.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LlavaFamily:
    """LLaVA 1.5 (7B/13B, RLAIF-V-7B and any llava-hf checkpoint of the same architecture)."""

    name: ClassVar[str] = "llava"
    chat_decoding: ClassVar[Decoding] = BEAM3_GREEDY

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        tokenizer: Any,
        image_processor: CLIPImageProcessor,
        *,
        max_length: int | None = None,
        system: str = SYSTEM,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # shared-prefix packing (the hooks below) and one prefill per repeated prompt (generate_ids' repeats)
        self.fast = FastPath(packing=True, shares_generation_prefix=True)
        self.image_processor = image_processor
        self.system = system
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        vision = cfg.vision_config
        self.num_image_tokens = (vision.image_size // vision.patch_size) ** 2  # CLS dropped ("default" strategy)
        ctx = cfg.text_config.max_position_embeddings
        tok_max = getattr(tokenizer, "model_max_length", ctx) or ctx
        self.max_length = max_length or min(ctx, tok_max if tok_max < 1e9 else ctx)
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
        max_length: int | None = None,
        vision_tower: str | Path | None = None,
        **kwargs: Any,
    ) -> LlavaFamily:
        """Load a llava-hf or original-format checkpoint; merge the LoRA adapter at ``lora_path`` if given.

        Args:
            vision_tower: local directory of the CLIP tower for an original-format checkpoint whose weights lack it
                (liuhaotian/llava-v1.5-7b); by default ``mm_vision_tower`` is looked up as a local directory, then
                in the Hugging Face cache.
        """
        path = Path(path)
        cfg = read_config(path)
        fmt = checkpoint_format(cfg, path)
        if fmt.family != "llava":
            raise ValueError(f"{path} is a {fmt.layout} checkpoint, not LLaVA; load it with family '{fmt.family}'")
        if fmt.layout == "llava-original":
            model, tokenizer = load_original(path, cfg, dtype, vision_tower=vision_tower)
        else:
            if vision_tower is not None:
                raise ValueError(
                    f"{path}: vision_tower= applies to original-format checkpoints; a llava-hf checkpoint holds "
                    "its own tower"
                )
            model, tokenizer = _load_hf(path, dtype)
        if (path / "preprocessor_config.json").is_file():
            image_processor = CLIPImageProcessor.from_pretrained(path)
        else:
            image_processor = make_image_processor(model.config.vision_config.image_size)
        if lora_path is not None:
            sd = convert.merge_lora(dict(model.state_dict()), Path(lora_path))
            model.load_state_dict(sd)
        model.to(device).eval()
        return cls(model, tokenizer, image_processor, max_length=max_length, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Save in the llava-hf format (model, tokenizer, image processor)."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def save_original(self, path: str | Path, vision_tower: str = "openai/clip-vit-large-patch14-336") -> None:
        """Save in the original ``llava_llama`` layout (what liuhaotian/llava-v1.5-7b and RLAIF-V-7B ship)."""
        save_original_format(self.model, self.tokenizer, path, vision_tower=vision_tower)

    # ------------------------------------------------------------------ encoding
    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = [self.tokenizer.bos_token_id] + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self._expand_image(ids)

    def _expand_image(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
        return out

    def _encode_one(self, i: int, s: Sample, for_generation: bool) -> tuple[list[int], list[bool], bool]:
        if not isinstance(s.question, str) or not s.question.strip():
            raise ValueError(f"sample {i}: empty question; every sample needs a non-empty 'question' string")
        prompt = render_prompt(s.question, has_image=s.image is not None, system=self.system)
        if for_generation:
            ids = self._prompt_ids(prompt)
            if len(ids) >= self.max_length:
                raise ValueError(
                    f"sample {i}: the prompt is {len(ids)} tokens (with {self.num_image_tokens} image "
                    f"tokens), over the model's context of {self.max_length}; shorten the question"
                )
            return ids, [False] * len(ids), False
        if s.answer is None:
            raise ValueError(f"sample {i}: no answer to encode; pass for_generation=True to encode the prompt only")
        # Tokenise prompt + answer in one pass (as the original does) and find the answer by character offsets:
        # robust to any tokenizer's handling of the space between "ASSISTANT:" and the answer.
        enc = self.tokenizer(prompt + " " + s.answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, is_answer = [self.tokenizer.bos_token_id], [False]
        for t, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
            answer_tok = start >= len(prompt)
            n = self.num_image_tokens if t == self.image_token_id else 1
            ids.extend([t] * n)
            is_answer.extend([answer_tok] * n)
        ids.append(self.tokenizer.eos_token_id)  # the end-of-turn token "</s>" is scored too
        is_answer.append(True)
        n_prompt = is_answer.index(True)
        if n_prompt >= self.max_length:
            raise ValueError(
                f"sample {i}: the prompt is {n_prompt} tokens (with {self.num_image_tokens} image "
                f"tokens), over max_length {self.max_length}; shorten the question"
            )
        truncated = len(ids) > self.max_length
        if truncated:  # policy: cut the answer's tail (end-of-turn included), never the prompt or image tokens
            ids, is_answer = ids[: self.max_length], is_answer[: self.max_length]
        return ids, is_answer, truncated

    def encode(self, samples: Sequence[Sample], *, for_generation: bool = False) -> dict[str, torch.Tensor]:
        """See ``ModelFamily.encode``; also returns ``truncated`` (B,) for answers cut at ``max_length``."""
        rows = [self._encode_one(i, s, for_generation) for i, s in enumerate(samples)]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        ans = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (row, mask, _) in enumerate(rows):
            sl = slice(width - len(row), width) if for_generation else slice(0, len(row))  # left pad for generation
            ids[b, sl] = torch.tensor(row)
            attn[b, sl] = 1
            ans[b, sl] = torch.tensor(mask)
        batch = {"input_ids": ids, "attention_mask": attn}
        if not for_generation:
            batch["answer_mask"] = ans
            batch["truncated"] = torch.tensor([r[2] for r in rows])
        images = [s.image for s in samples if s.image is not None]
        if images:
            # preprocess each distinct image object once (a pair's two answers, a prompt's yes/no questions)
            slot: dict[int, int] = {}
            distinct: list[Image.Image] = []
            for im in images:
                if id(im) not in slot:
                    slot[id(im)] = len(distinct)
                    distinct.append(im)
            pixels = preprocess(distinct, self.image_processor)
            batch["pixel_values"] = pixels[[slot[id(im)] for im in images]]
        return batch

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device
        out = {k: to_device(batch[k], dev) for k in ("input_ids", "attention_mask")}
        if "pixel_values" in batch:
            out["pixel_values"] = to_device(batch["pixel_values"], dev).to(next(self.model.parameters()).dtype)
        return out

    def forward(self, batch: dict[str, torch.Tensor], *, model: torch.nn.Module | None = None) -> torch.Tensor:
        inputs = self._inputs(batch)
        # positions from the mask, so a left-padded row sees the same positions as when run alone
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
    def _core(self) -> LlavaForConditionalGeneration:
        """The Llava model under any wrapper (peft's PeftModel keeps LoRA layers active in it)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def image_features(self, batch: dict[str, torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor | None]:
        """Projected patch features (576, H) for each listed row (None for a text-only row)."""
        has_image = (batch["input_ids"] == self.image_token_id).any(-1).tolist()
        pix_index = [sum(has_image[:r]) for r in range(len(has_image))]
        keep = [pix_index[r] for r in rows if has_image[r]]
        if not keep:
            return [None] * len(rows)
        core = self._core().model
        pixels = to_device(batch["pixel_values"][keep], self.device).to(next(self.model.parameters()).dtype)
        out = core.vision_tower(pixels, output_hidden_states=True)
        feats = out.hidden_states[self.model.config.vision_feature_layer][:, 1:]  # penultimate layer, CLS dropped
        feats = core.multi_modal_projector(feats)  # (n, 576, H)
        it = iter(feats)
        return [next(it) if has_image[r] else None for r in rows]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._core().model.language_model.embed_tokens(input_ids)

    def decoder_hidden(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        lm = self._core().model.language_model
        mask = attention_mask_for(attention_mask, inputs_embeds, lm.config._attn_implementation)
        return lm(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def output_head(self) -> torch.nn.Linear:
        return self._core().lm_head

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The LM's decoder layers (compiled on the packed GPU path, ``muffin.fast.compiled_layers.compile_packed_layers``)."""
        return self._core().model.language_model.layers

    # ------------------------------------------------------------------ training hooks
    def lora_target_modules(self) -> list[str]:
        """Every nn.Linear of the language model (not the vision tower, not the projector, not lm_head)."""
        return [
            n
            for n, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".language_model." in f".{n}"
        ]

    def trainable_modules(self) -> list[str]:
        return ["model.multi_modal_projector"]

    def frozen_modules(self) -> list[str]:
        return ["model.vision_tower"]


def meta_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """The model a loader builds for ``config``, on the meta device (no memory): what the files must cover."""
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _load_hf(path: Path, dtype: torch.dtype) -> tuple[LlavaForConditionalGeneration, Any]:
    """A llava-hf checkpoint: its files are checked against the model built on the meta device, then loaded."""
    check_transformers_checkpoint(meta_model(LlavaConfig.from_pretrained(path)), path)
    model, info = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, output_loading_info=True)
    check_loading_info(info, str(path))
    return model, load_tokenizer(path)


def original_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer with ``<image>`` and ``<pad>`` added after its vocabulary, as llava-hf has them."""
    tokenizer = load_tokenizer(path)
    tokenizer.add_special_tokens({"additional_special_tokens": [convert.IMAGE_TOKEN]})
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": convert.PAD_TOKEN})
    return tokenizer


def original_llava_config(
    path: Path, cfg: dict[str, Any], tokenizer: Any, tower_dir: Path | None = None
) -> LlavaConfig:
    """The transformers config of an original-format checkpoint (vocabulary grown for the added tokens)."""
    return convert.llava_config_from_original(
        cfg,
        path,
        convert.round_up(len(tokenizer)),
        tokenizer.convert_tokens_to_ids(convert.IMAGE_TOKEN),
        tokenizer.pad_token_id,
        tower_dir,
    )


def load_original(
    path: Path, cfg: dict[str, Any], dtype: torch.dtype, *, vision_tower: str | Path | None = None
) -> tuple[LlavaForConditionalGeneration, Any]:
    """Load an original-format checkpoint and convert it to transformers' Llava (see ``llava.convert``).

    The weights must cover every parameter of the model built from ``config.json`` (the CLIP tower may come from
    a separate directory); ``rotary_emb.inv_freq`` buffers are dropped by name; anything else is an error.
    """
    orig_vocab = cfg.get("vocab_size")
    raw = drop_known_buffers(convert.load_state_dict_files(path))  # memory-mapped
    has_tower = any(k.startswith("model.vision_tower.") for k in raw)
    if has_tower and vision_tower is None:  # RLAIF-V-7B: tower weights inside; its config from the named tower
        tower_dir, tower_config = None, find_vision_tower(cfg)  # when local, else from llava.convert's table
    else:
        tower_dir = tower_config = resolve_vision_tower(cfg, path, vision_tower)
    tokenizer = original_tokenizer(path)
    config = original_llava_config(path, cfg, tokenizer, tower_config)
    meta = meta_model(config)
    flat = convert.has_flat_vision(meta)
    sd = convert.orig_to_hf_state_dict(raw, flat)
    if tower_dir is not None:
        if has_tower:
            logger.info("%s: vision tower taken from %s, not from the checkpoint's own weights", path, tower_dir)
        sd = {k: v for k, v in sd.items() if not k.startswith("model.vision_tower.")}
        sd.update(convert.orig_to_hf_state_dict(_vision_weights(tower_dir), flat))
    new_vocab = config.text_config.vocab_size
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in sd:
            if sd[key].shape[0] != orig_vocab:
                raise ValueError(
                    f"{path}: {convert.map_key(key, convert.HF_TO_ORIG)} has {sd[key].shape[0]} rows but "
                    f"config.json says vocab_size {orig_vocab}"
                )
            sd[key] = convert.grow_rows(sd[key], new_vocab)
    hint = "" if tower_dir is None else f" (vision tower from {tower_dir})"
    check_coverage(model_tensors(meta), {k: tuple(v.shape) for k, v in sd.items()}, str(path), hint=hint)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=sd, dtype=dtype, output_loading_info=True
    )
    check_loading_info(info, str(path))
    return model, tokenizer


def find_vision_tower(cfg: dict[str, Any], override: str | Path | None = None) -> Path | None:
    """The local directory of the CLIP tower, or None: ``override``, else ``mm_vision_tower`` as a local directory
    or as a hub id already in the Hugging Face cache (the original code loads it from the hub by that id)."""
    if override is not None:
        found = Path(override)
        if not (found / "config.json").is_file():
            raise FileNotFoundError(f"vision_tower='{override}' is not a directory holding a CLIP config.json")
        return found
    tower = cfg.get("mm_vision_tower")
    if not tower:
        return None
    if (Path(tower) / "config.json").is_file():
        return Path(tower)
    if not Path(tower).is_absolute() and tower.count("/") == 1:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(tower, local_files_only=True))
        except LocalEntryNotFoundError:
            return None
    return None


def resolve_vision_tower(cfg: dict[str, Any], path: Path, override: str | Path | None = None) -> Path:
    """``find_vision_tower``, or an error that says what to download and how to point at it."""
    found = find_vision_tower(cfg, override)
    if found is not None:
        return found
    from huggingface_hub import constants

    tower = cfg.get("mm_vision_tower")
    raise FileNotFoundError(
        f"{path}: the weights hold no vision tower, and mm_vision_tower={tower!r} is not a local directory nor "
        f"in the Hugging Face cache ({constants.HF_HUB_CACHE}). Download it once with `huggingface-cli download "
        f"{tower}` (found in the cache from then on), or with `huggingface-cli download {tower} --local-dir DIR` "
        "and pass vision_tower=DIR to load_family (or write DIR into mm_vision_tower of the checkpoint's config.json)."
    )


def _vision_weights(tower: Path) -> dict[str, torch.Tensor]:
    """The CLIP tower's weights of a local CLIP directory, in the original checkpoint's key layout."""
    sd = convert.load_state_dict_files(tower)
    out = {
        "model.vision_tower.vision_tower." + k.removeprefix("vision_tower."): v
        for k, v in sd.items()
        if k.startswith(("vision_model.", "vision_tower.vision_model."))
    }
    if not out:
        raise KeyError(f"{tower}: no CLIP vision weights (keys 'vision_model.*'); is this a CLIP checkpoint?")
    return drop_known_buffers(out)


def save_original_format(
    model: LlavaForConditionalGeneration,
    tokenizer: Any,
    path: str | Path,
    *,
    vision_tower: str = "openai/clip-vit-large-patch14-336",
) -> None:
    """Write ``model`` in the original ``llava_llama`` layout, dropping the tokens the conversion added."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    base_vocab = tokenizer.convert_tokens_to_ids(convert.IMAGE_TOKEN)  # <image> was the first added token
    sd = convert.hf_to_orig_state_dict({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[key] = sd[key][:base_vocab].clone()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    text = cfg.text_config.to_dict()
    for k in ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        text.pop(k, None)
    text.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        vocab_size=base_vocab,
        mm_projector_type="mlp2x_gelu",
        mm_vision_tower=vision_tower,
        mm_vision_select_layer=cfg.vision_feature_layer,
        mm_vision_select_feature="patch",
        mm_hidden_size=cfg.vision_config.hidden_size,
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        pad_token_id=None,
    )
    if vision_tower not in convert.KNOWN_VISION_TOWERS:
        # our extension: a tower unknown to the original code carries its config along
        v = cfg.vision_config.to_dict()
        text["mm_vision_config"] = {k: v[k] for k in convert.KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"]}
    (path / "config.json").write_text(json.dumps(text, indent=2))
    base_tok = _strip_added_tokens(tokenizer, base_vocab)
    base_tok.save_pretrained(path)


def _strip_added_tokens(tokenizer: Any, base_vocab: int) -> Any:
    """A copy of the tokenizer without the tokens at ids >= base_vocab (``<image>``, ``<pad>``)."""
    import copy
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < base_vocab]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
    )
    fast.model_max_length = copy.copy(tokenizer.model_max_length)
    return fast
