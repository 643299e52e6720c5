"""``model.generate`` for the families built on transformers' generation loop (LLaVA, OmniLMM) with a static KV cache
written in place and one prefill per distinct prompt (a prompt sampled n times is encoded and prefilled once, its
keys and values copied to its n rows); the answers are the repeated batch's, up to rounding."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StaticCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

# the cache's name in generate's kwargs and outputs: "past_key_values" in transformers 5.17 (our GPU machine),
# "cache" in 5.24 (which still takes the old name, with a deprecation warning)
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)} else "past_key_values"


# the cache is ours, whatever a checkpoint's generation config says (the original LLaVA format and transformers'
# Trainer save use_cache=False; some set a cache_implementation, which generate refuses next to a cache passed in)
_OUR_CACHE = {"disable_compile": True, "use_cache": True, "cache_implementation": None}


class PrefixNotShareable(ValueError):
    """A batch whose repeated rows cannot share one prefill (a prompt longer than the model's sliding window)."""


def generate_new_ids(
    model: Any,
    inputs: dict[str, torch.Tensor],
    *,
    repeats: Sequence[int] | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """New token ids (sum(repeats), T_new) for a left-padded generation batch ``inputs`` (``input_ids``,
    ``attention_mask`` and the model's vision inputs, on the model's device).

    Row ``i`` of ``inputs`` becomes ``repeats[i]`` consecutive output rows (all 1 when ``repeats`` is None).
    ``generate_kwargs`` go to ``model.generate`` and must include ``max_new_tokens`` (it sizes the cache).

    The cache is a ``StaticCache`` for prompt + ``max_new_tokens``, written in place (transformers' default cache
    copies every layer's keys and values at each step); the auto-compilation transformers turns on for it is off
    (it recompiles for every prompt length, and its fused kernels round differently). With ``repeats`` each distinct
    prompt's image and all but its last token run once through generate's own prefill, so positions and masks are
    the repeated batch's: the answers equal that batch's bit for bit in float32 (in bf16 the prefill's matmuls over
    fewer rows may round differently and flip a near-tie). Beam search keeps transformers' cache (it reorders it
    by beam) and takes no ``repeats``.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n, length = ids.shape
    reps = [1] * n if repeats is None else [int(r) for r in repeats]
    if len(reps) != n or min(reps, default=1) < 1:
        raise ValueError(f"repeats must give a count >= 1 for each of the batch's {n} rows; got {list(reps)}")
    max_new = generate_kwargs.get("max_new_tokens")
    if max_new is None:
        raise ValueError("generate_new_ids needs max_new_tokens (it sizes the static cache); set it in the Decoding")
    config = getattr(model, "generation_config", None)
    if generate_kwargs.get("num_beams", getattr(config, "num_beams", None) or 1) > 1:
        if any(r > 1 for r in reps):
            raise ValueError("repeats > 1 is for greedy or sampled decoding; beam search expands its own rows")
        return model.generate(**inputs, **generate_kwargs)[:, length:]
    generate_kwargs = {**generate_kwargs, **_OUR_CACHE}
    cache = StaticCache(config=model.config, max_cache_len=length + int(max_new))
    if all(r == 1 for r in reps):
        return model.generate(**inputs, **{_CACHE: cache}, **generate_kwargs)[:, length:]
    # the prefix's keys and values are copied into the static cache from position 0: a sliding-window layer's
    # prefill cache keeps the last window - 1 tokens, i.e. the whole prefix (length - 1 tokens) while length <= window
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
    if length < 2 or (window is not None and length > window):
        raise PrefixNotShareable(
            f"cannot share a prefill across repeated rows for prompts of {length} tokens"
            + (f" (the model's sliding window is {window})" if window is not None else "")
            + "; pass the repeated rows themselves (repeats=None; muffin.inference.generate(..., share_prefix=False))"
        )
    rows = _row_index(reps, ids.device)
    # the prefix of each distinct prompt (image included), run once through generate's own prefill so that its
    # positions and masks are the ones generate gives the whole prompt; the one token it then picks is dropped
    prefix = model.generate(
        **{**inputs, "input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]},
        max_new_tokens=1,
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        pad_token_id=generate_kwargs.get("pad_token_id"),
        eos_token_id=generate_kwargs.get("eos_token_id"),
        **_OUR_CACHE,
    )
    prefix = getattr(prefix, _CACHE)
    for i, layer in enumerate(prefix.layers):
        cache.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), i)
        layer.keys = layer.values = None  # free the prefix's copy as the expanded one is written
    del prefix
    # the repeated rows without their vision inputs: everything up to the last prompt token is in the cache
    out = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **{_CACHE: cache}, **generate_kwargs)
    return out[:, length:]


def _row_index(reps: Sequence[int], device: torch.device) -> torch.Tensor:
    """Input row of each output row: 0 repeated reps[0] times, then 1, ..."""
    return torch.repeat_interleave(torch.arange(len(reps), device=device), torch.tensor(reps, device=device))
