"""Conversion between the original LLaVA checkpoint layout (``llava_llama``) and transformers' Llava.

Original keys (liuhaotian/llava-v1.5-7b, openbmb/RLAIF-V-7B)      transformers v5 keys
``model.embed_tokens / model.layers.* / model.norm``             ``model.language_model.*``
``lm_head``                                                      ``lm_head``
``model.mm_projector.0`` / ``model.mm_projector.2``              ``model.multi_modal_projector.linear_1/2``
``model.vision_tower.vision_tower.vision_model.*``               ``model.vision_tower.vision_model.*``

The original vocabulary (32000 for Llama) has no image token: the original splices image features at a -200
placeholder. On conversion we add ``<image>`` and ``<pad>`` to the tokenizer (as llava-hf does) and grow the
embedding and ``lm_head`` rows, rounded up to a multiple of 64 (32000 -> 32064, as llava-hf), initialising new
rows with the mean of the old ones. The logits of the original vocabulary are unchanged. The 32
``model.layers.N.self_attn.rotary_emb.inv_freq`` buffers liuhaotian's files carry are dropped by name
(``muffin.weights``); the CLIP tower, absent from liuhaotian's files, comes from the ``mm_vision_tower`` checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

logger = logging.getLogger(__name__)

# (original regex, transformers replacement), applied in order; the inverse map is derived below.
ORIG_TO_HF: list[tuple[str, str]] = [
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower.vision_model."),
    (r"^model\.(embed_tokens|layers|norm)\b", r"model.language_model.\1"),
]
HF_TO_ORIG: list[tuple[str, str]] = [
    (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^model\.vision_tower\.(vision_model\.)?", "model.vision_tower.vision_tower.vision_model."),
    (r"^model\.language_model\.", "model."),
]

# The CLIP tower named by `mm_vision_tower` in the published configs (not stored in liuhaotian's checkpoint).
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
}
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"


def map_key(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def orig_to_hf_state_dict(sd: dict[str, torch.Tensor], flat_vision: bool = False) -> dict[str, torch.Tensor]:
    """Original -> transformers keys. ``flat_vision``: the installed transformers names the CLIP tower's
    weights ``model.vision_tower.embeddings...`` (5.2x) instead of ``model.vision_tower.vision_model.embeddings...``."""
    out = {map_key(k, ORIG_TO_HF): v for k, v in sd.items()}
    if flat_vision:
        out = {k.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1): v for k, v in out.items()}
    return out


def has_flat_vision(model: torch.nn.Module) -> bool:
    """True when ``model``'s CLIP tower keys have no ``vision_model.`` level (depends on the transformers version)."""
    return not any(k.startswith("model.vision_tower.vision_model.") for k in model.state_dict())


def hf_to_orig_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {map_key(k, HF_TO_ORIG): v for k, v in sd.items()}


# Fields an original config must state: without them LlamaConfig would fill in its default (7B) sizes.
REQUIRED_TEXT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)


def vision_config_from_original(cfg: dict[str, Any], path: Path, tower_dir: Path | None = None) -> CLIPVisionConfig:
    """CLIP config of the tower: the local tower directory when one is used, else ``mm_vision_config`` (saved by
    us) or the known config of the hub id in ``mm_vision_tower``."""
    if tower_dir is not None:
        data = json.loads((tower_dir / "config.json").read_text())
        vision = CLIPVisionConfig(**data.get("vision_config", data))
    elif "mm_vision_config" in cfg:
        vision = CLIPVisionConfig(**cfg["mm_vision_config"])
    elif cfg.get("mm_vision_tower") in KNOWN_VISION_TOWERS:
        vision = CLIPVisionConfig(**KNOWN_VISION_TOWERS[cfg["mm_vision_tower"]])
    else:
        raise ValueError(
            f"{path}/config.json: unknown mm_vision_tower {cfg.get('mm_vision_tower')!r}. Pass vision_tower=DIR "
            f"(a local CLIP directory with config.json) or use one of: {', '.join(KNOWN_VISION_TOWERS)}."
        )
    width = cfg.get("mm_hidden_size")
    if width is not None and width != vision.hidden_size:
        raise ValueError(
            f"{path}/config.json: mm_hidden_size={width} but the vision tower is {vision.hidden_size} wide; "
            "the tower does not belong to this checkpoint"
        )
    return vision


def llava_config_from_original(
    cfg: dict[str, Any],
    path: Path,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    tower_dir: Path | None = None,
) -> LlavaConfig:
    """Build a transformers ``LlavaConfig`` equivalent to an original ``llava_llama`` config (sizes all stated)."""
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError(f"{path}: mm_projector_type={cfg.get('mm_projector_type')!r}; LLaVA 1.5 uses 'mlp2x_gelu'")
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"{path}: mm_vision_select_feature must be 'patch' (CLS dropped) for LLaVA 1.5")
    if cfg.get("mm_use_im_start_end"):
        raise ValueError(f"{path}: mm_use_im_start_end=true is not LLaVA 1.5's format and is not supported")
    missing = [k for k in REQUIRED_TEXT_FIELDS if k not in cfg]
    if missing:
        raise ValueError(
            f"{path}/config.json lacks {missing}; an original LLaVA config states every size of its Llama "
            "(refusing to build one from default sizes)"
        )
    text_keys = set(LlamaConfig().to_dict()) - {"architectures", "model_type", "transformers_version"}
    text = LlamaConfig(**{k: v for k, v in cfg.items() if k in text_keys})
    text.vocab_size = vocab_size
    text.pad_token_id = pad_token_id
    vision = vision_config_from_original(cfg, path, tower_dir)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        pad_token_id=pad_token_id,
    )


def load_state_dict_files(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (sharded or not, safetensors or .bin)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    bins = sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin" and "non_lora" not in p.name)
    if not bins:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weight files")
    sd = {}
    for f in bins:  # memory-mapped: tensors are read from disk when converted, not all at once
        sd.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return sd


def grow_rows(weight: torch.Tensor, new_rows: int) -> torch.Tensor:
    """Append rows equal to the mean row (new tokens start neutral); ``new_rows`` is the final row count."""
    extra = new_rows - weight.shape[0]
    if extra <= 0:
        return weight
    return torch.cat([weight, weight.float().mean(0, keepdim=True).to(weight.dtype).expand(extra, -1)], 0)


def round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def merge_lora(sd: dict[str, torch.Tensor], lora_dir: Path) -> dict[str, torch.Tensor]:
    """Merge a LoRA adapter (peft layout, original or transformers key names) into a transformers state dict.

    W <- W + (alpha / r) * B @ A (``alpha / sqrt(r)`` with rsLoRA), plus ``non_lora_trainables`` (the trained
    projector of the original LoRA recipe, or our trainer's trained non-LoRA weights) replacing the base weights.
    """
    from safetensors.torch import load_file

    cfg_file = lora_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"LoRA directory '{lora_dir}' has no adapter_config.json")
    cfg = json.loads(cfg_file.read_text())
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    if (lora_dir / "adapter_model.safetensors").is_file():
        adapter = load_file(str(lora_dir / "adapter_model.safetensors"))
    elif (lora_dir / "adapter_model.bin").is_file():
        adapter = torch.load(lora_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"LoRA directory '{lora_dir}' has no adapter_model.safetensors or adapter_model.bin")

    flat = not any(k.startswith("model.vision_tower.vision_model.") for k in sd)

    def normalise(key: str) -> str:
        key = re.sub(r"^base_model\.model\.", "", key)
        return next(iter(orig_to_hf_state_dict({key: None}, flat)))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in adapter.items():
        m = re.match(r"(.*)\.lora_([AB])(?:\.default)?\.weight$", k)
        if m:
            pairs.setdefault(normalise(m.group(1)) + ".weight", {})[m.group(2)] = v
    for target, ab in pairs.items():
        if target not in sd:
            raise KeyError(f"LoRA adapter in {lora_dir} targets '{target}', which the base model does not have")
        w = sd[target]
        sd[target] = (w.float() + scale * (ab["B"].float() @ ab["A"].float())).to(w.dtype)
    extra_files = [lora_dir / "non_lora_trainables.safetensors", lora_dir / "non_lora_trainables.bin"]
    for f in extra_files:
        if f.is_file():
            extra = (
                load_file(str(f))
                if f.suffix == ".safetensors"
                else torch.load(f, map_location="cpu", weights_only=True)
            )
            for k, v in extra.items():
                key = normalise(k)
                if key not in sd:
                    raise KeyError(f"{f}: weight '{k}' (-> '{key}') is not in the base model")
                sd[key] = v.to(sd[key].dtype)
            break
    logger.info("merged LoRA %s: %d adapted matrices (scale %.4g)", lora_dir, len(pairs), scale)
    return sd
