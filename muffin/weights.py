"""Which tensors a checkpoint holds, and the check that they cover every parameter of the model built for it.

Every family loader calls ``check_coverage`` before it trusts a load: a parameter the files lack is an error naming
it (never a silently random weight), a known non-parameter buffer (``rotary_emb.inv_freq``) is dropped by name,
and any other tensor the model has no place for is an error too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

# Tensors some published checkpoints carry that are not parameters of the model (recomputed at build time):
# transformers < 4.32 saved Llama's rotary inverse frequencies (liuhaotian/llava-v1.5-7b holds 32 of them) and
# CLIP's position ids (older saves of openai/clip-vit-large-patch14-336).
NON_PARAMETER_BUFFERS: tuple[str, ...] = (r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)embeddings\.position_ids$")

Shape = tuple[int, ...]


def is_known_buffer(key: str) -> bool:
    """True for a checkpoint tensor that is a known non-parameter buffer (``NON_PARAMETER_BUFFERS``)."""
    return any(re.search(p, key) for p in NON_PARAMETER_BUFFERS)


def drop_known_buffers(state: Mapping[str, object]) -> dict[str, object]:
    """``state`` without the known non-parameter buffers, by name."""
    return {k: v for k, v in state.items() if not is_known_buffer(k)}


def _shown(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_coverage(
    expected: Mapping[str, Shape | None],
    found: Mapping[str, Shape | None],
    where: str,
    *,
    aliases: Iterable[set[str]] = (),
    hint: str = "",
) -> None:
    """Raise ``KeyError`` unless ``found`` (checkpoint names, converted) equals ``expected`` (model names) one to one.

    Known non-parameter buffers in ``found`` are ignored; of a group of tied ``aliases`` one name is enough.
    Shapes are compared where both sides give one.
    """
    found = drop_known_buffers(found)
    missing = set(expected) - set(found)
    for group in aliases:  # tied weights: one stored name serves them all
        if group & set(found):
            missing -= group
    unexpected = set(found) - set(expected)
    mismatched = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if expected[k] is not None and found[k] is not None and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} model parameters are not in the checkpoint: {_shown(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensors have no place in the model: {_shown(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shapes differ: {'; '.join(mismatched[:4])}")
    raise KeyError(
        f"{where}: the weights do not match the model built from its config.json. " + ". ".join(parts) + hint
    )


def check_loading_info(info: Mapping[str, Iterable], where: str, *, hint: str = "") -> None:
    """Raise ``KeyError`` naming the keys when transformers' ``output_loading_info`` reports any problem."""
    problems = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems["unexpected_keys"] = [k for k in problems["unexpected_keys"] if not is_known_buffer(k)]
    if any(problems.values()):
        shown = "; ".join(f"{k}: {_shown(v)}" for k, v in problems.items() if v)
        raise KeyError(f"{where}: the weights do not match the model built from its config.json ({shown}).{hint}")


def index_file(path: Path) -> Path | None:
    """The weight index (``*.index.json``) of a checkpoint directory, if it has one."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            return path / name
    return None


def checkpoint_tensors(path: str | Path) -> dict[str, Shape | None]:
    """Names of the tensors a checkpoint directory holds -> their shapes (None where only a .bin would tell).

    Safetensors headers are read without loading a tensor; an index without its shards gives names only.
    """
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        out: dict[str, Shape | None] = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
        return out
    index = index_file(path)
    if index is not None:
        return dict.fromkeys(json.loads(index.read_text())["weight_map"])
    raise FileNotFoundError(f"{path}: no *.safetensors files and no weight index (*.index.json)")


def model_tensors(model: torch.nn.Module) -> dict[str, Shape]:
    """Names and shapes of what a model loads from a checkpoint (its state dict: parameters + persistent buffers)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tied_aliases(model: torch.nn.Module) -> list[set[str]]:
    """Groups of parameter names that share one tensor (a tied ``lm_head``): a checkpoint stores one of them."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def transformers_key_map(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> model key, renamed exactly as ``PreTrainedModel.from_pretrained`` renames on load.

    transformers 5 converts older layouts on load (llava-hf's ``language_model.model.*`` becomes
    ``model.language_model.*``); this applies the same rename table and base-model-prefix rule to key names only.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    out = {}
    for key in keys:
        new, _ = rename_source_key(key, renamings, converters, prefix, meta)
        if new not in meta and key in meta:  # as from_pretrained: a key already in the model's layout stays
            new, _ = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        out[key] = new
    return out


def check_transformers_checkpoint(
    model: torch.nn.Module, path: str | Path, where: str | None = None, *, hint: str = ""
) -> None:
    """Check a transformers-format checkpoint against ``model`` (built on the meta device) before loading it.

    Names go through ``transformers_key_map``; shapes come from the safetensors headers. Nothing is allocated.
    """
    found = checkpoint_tensors(path)
    renamed = transformers_key_map(model, found)
    if len(set(renamed.values())) != len(renamed):
        raise KeyError(f"{where or path}: several checkpoint tensors map to one model parameter")
    found = {renamed[k]: s for k, s in found.items()}
    check_coverage(model_tensors(model), found, where or str(path), aliases=tied_aliases(model), hint=hint)
