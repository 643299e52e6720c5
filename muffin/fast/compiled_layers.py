"""Decoder layers compiled on the flat packed row, with gradient checkpointing traced into their graph (the backward
recomputes inside the compiled graph); every other call of a layer stays eager."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit, Unsupported
from torch.utils.checkpoint import checkpoint

from muffin.family import COMPILE_LAYERS, LayeredModel
from muffin.fast.attention import BlockMask, lm_config
from muffin.fast.dropout import seed_dropout, seeded_modules

logger = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # torch.compile backend of the packed decoder layers ("eager" in CPU tests)
COMPILE_MIN_HIDDEN = 2048  # "auto" compiles the layers of LMs at least this wide (LLaVA 7B, OmniLMM, MiniCPM: 4096)


COMPILE_MIN_CALLS = 500  # "auto" leaves a stage eager when it runs fewer packed batches (docs/PERFORMANCE.md)


def parse_compile_layers(value: str | bool, flag: str = "--compile_layers") -> bool | str:
    """A command line's compile setting: ``auto``, ``true`` / ``false`` (any case, or a bool) -> ``COMPILE_LAYERS``."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[v]
    raise ValueError(f"{flag} must be auto, true or false, not {value!r}")


def for_planned_calls(mode: bool | str, calls: int | None) -> bool | str:
    """The compile setting for a stage that will run ``calls`` packed batches on a rank: ``"auto"`` turns to False
    below ``COMPILE_MIN_CALLS`` (compiling a 7B model's layers costs more than a short run saves), else stays
    ``"auto"`` (device and width decide, ``use_compiled_layers``); True and False are kept as given."""
    mode = parse_compile_layers(mode)
    if mode == "auto" and calls is not None and calls < COMPILE_MIN_CALLS:
        return False
    return mode


@contextlib.contextmanager
def planned_compile(family, mode: bool | str, calls: int | None) -> Iterator[None]:
    """``family.fast.compile_layers`` set by ``for_planned_calls`` while the block runs, restored after."""
    before = family.fast.compile_layers
    family.fast.compile_layers = for_planned_calls(mode, calls)
    try:
        yield
    finally:
        family.fast.compile_layers = before


def use_compiled_layers(family, device: torch.device) -> bool:
    """Whether the flat row runs the decoder layers compiled (``family.fast.compile_layers``: ``"auto"``,
    the default, = on CUDA for a family that lists its ``decoder_layers()`` and whose LM is at least
    ``COMPILE_MIN_HIDDEN`` wide (every released checkpoint; the tiny world models would pay the compilation in
    each stage's process for no measurable gain); ``True``; ``False``)."""
    mode = family.fast.compile_layers
    if mode not in COMPILE_LAYERS:
        raise ValueError(f"family.fast.compile_layers must be 'auto', True or False, not {mode!r}")
    if mode is False or not isinstance(family, LayeredModel):
        return False
    if any(hasattr(p, "ds_id") for p in family.model.parameters()):
        return False  # ZeRO-3 gathers partitioned weights in hooks that a compiled graph would skip
    if mode is True:
        return True
    return device.type == "cuda" and _lm_hidden_size(family) >= COMPILE_MIN_HIDDEN


def _lm_hidden_size(family) -> int:
    return int(getattr(lm_config(family), "hidden_size", 0) or 0)


def compile_packed_layers(family) -> None:
    """Run each decoder layer through ``torch.compile`` (dynamic shapes) whenever it is called with a ``BlockMask``
    (the packed flat row); every other call (generation, the plain path) stays eager. Idempotent.

    Compiling fuses what the layer does between its matrix products (RMSNorm, rotary embedding, SiLU gate, LoRA
    dropout, residual adds, casts) and cuts kernel launches (docs/PERFORMANCE.md, run 6). A layer that is
    gradient-checkpointed is compiled with the checkpoint inside (``checkpointing_in_compiled_layers``): the forward
    saves only the layer's inputs and the backward graph recomputes what it needs, fused with the backward kernels,
    instead of running the whole compiled forward again. LoRA dropout takes its masks from a per-call seed
    (``muffin.fast.dropout``), so the recomputation needs no random numbers. The first batches pay the compilation (20-60 s
    for a 7B model); later shapes reuse it (dynamic shapes). ``family.fast.compile_layers = False`` turns it off.
    """
    import torch._dynamo

    layers = list(family.decoder_layers())
    if all(getattr(layer, "_packed_compiled", False) for layer in layers):
        return
    # each layer adds cache entries to the code objects it runs: allow them all
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 8 * len(layers)))
    for layer in layers:
        if getattr(layer, "_packed_compiled", False):
            continue
        eager = layer._call_impl
        compiled = torch.compile(eager, dynamic=True, backend=COMPILE_BACKEND)
        # fullgraph: a graph break inside the checkpoint would make the recomputation save other tensors than the
        # forward (CheckpointError, and the same around a compiled call with graph breaks); it raises at tracing
        # instead, and the layer runs eagerly under the checkpoint (so does a layer the backend fails to compile)
        compiled_checkpointed = torch.compile(
            partial(_checkpointed, eager), dynamic=True, backend=COMPILE_BACKEND, fullgraph=True
        )

        def call(*args, _layer=layer, _compiled=compiled, _checkpointed=compiled_checkpointed, _eager=eager, **kwargs):
            if not isinstance(kwargs.get("attention_mask"), BlockMask):
                return _eager(*args, **kwargs)
            inside = getattr(_layer, "_checkpoint_inside", False)
            if inside and getattr(_layer, "_checkpoint_eager", False):
                return _eager_checkpointed(_layer, _eager, *args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            with seed_dropout(seeded_modules(_layer), hidden.device):
                if not inside:
                    return _compiled(*args, **kwargs)
                try:
                    with _forward_side_effects_not_replayed():
                        return _checkpointed(*args, **kwargs)
                except (Unsupported, BackendCompilerFailed, FailOnRecompileLimitHit) as e:
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            out = _eager_checkpointed(_layer, _eager, *args, **kwargs)  # raises the layer's own error, if any
            _layer._checkpoint_eager = True
            logger.warning(
                "%s does not compile under gradient checkpointing (%s): it runs eagerly, checkpointed (slower; "
                "family.fast.compile_layers = False does the same for every layer)",
                type(_layer).__name__,
                reason,
            )
            return out

        layer._compiled_call_impl = call  # what nn.Module.compile sets; nn.Module.__call__ runs it
        layer._packed_compiled = True


def _eager_checkpointed(layer: torch.nn.Module, call: Any, *args: Any, **kwargs: Any) -> Any:
    """The layer eagerly under torch's non-reentrant checkpoint, torch's own dropout (the checkpoint restores the
    generator for the recomputation; the hash masks would cost int64 temporaries of the input's size here)."""
    return checkpoint(_without_transformers_checkpoint, layer, call, *args, use_reentrant=False, **kwargs)


def _without_transformers_checkpoint(layer: torch.nn.Module, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call`` with transformers' checkpointing (inside ``forward`` on newer 5.x) off: the recomputation runs in the
    backward, after ``checkpointing_in_compiled_layers`` has switched it back on."""
    on = layer.gradient_checkpointing
    layer.gradient_checkpointing = False
    try:
        return call(*args, **kwargs)
    finally:
        layer.gradient_checkpointing = on


def _forward_side_effects_not_replayed() -> contextlib.AbstractContextManager:
    """Let dynamo trace a checkpointed layer whose forward writes Python state. transformers >= 5.25 routes attention
    through the ``kernels`` package, which sets a context variable on entry and resets it on exit: dynamo refuses that
    inside a checkpoint unless told not to replay it in the recomputation, which is exact here (the write is undone
    before the forward returns). Older torch has no such switch and older transformers no such write."""
    config = torch._dynamo.config
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    return contextlib.nullcontext()


def _checkpointed(call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call`` under torch's (non-reentrant) gradient checkpointing: compiled, the checkpoint is traced into the
    layer's graph and the partitioner recomputes inside the backward graph."""
    return checkpoint(call, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointing_in_compiled_layers(family) -> Iterator[None]:
    """While the block runs, the compiled layers that transformers would checkpoint (``gradient_checkpointing`` on,
    training, gradients enabled) checkpoint inside their compiled graph instead, with transformers' own switched off:
    transformers 5.17 checkpoints around ``__call__`` (around the compiled layer, whose forward then runs twice),
    newer 5.x inside ``forward``. Layers left out of checkpointing (``--checkpoint_layers``) are left alone."""
    if not torch.is_grad_enabled() or not isinstance(family, LayeredModel):
        yield
        return
    layers = [
        layer
        for layer in family.decoder_layers()
        if getattr(layer, "_packed_compiled", False)
        and getattr(layer, "gradient_checkpointing", False)
        and layer.training
    ]
    if layers:
        _warn_unused_checkpoint_options(layers[0])
    for layer in layers:
        layer.gradient_checkpointing = False
        layer._checkpoint_inside = True
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True
            layer._checkpoint_inside = False


_warned_options: set = set()


def _warn_unused_checkpoint_options(layer: torch.nn.Module) -> None:
    """Say once that the compiled layers checkpoint with torch's non-reentrant checkpoint and its defaults, whatever
    ``gradient_checkpointing_kwargs`` asked transformers for (``use_reentrant=False`` is the one that matches)."""
    options = dict(getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", None) or {})
    if options.get("use_reentrant") is False:
        options.pop("use_reentrant")
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    if options and key not in _warned_options:
        _warned_options.add(key)
        logger.warning(
            "the compiled decoder layers checkpoint with torch's non-reentrant checkpoint and its defaults; "
            "gradient_checkpointing_kwargs %s are not applied to them (family.fast.compile_layers = False applies them)",
            options,
        )


def uncompile_packed_layers(family) -> None:
    """Undo ``compile_packed_layers`` (the layers run eagerly again)."""
    for layer in family.decoder_layers():
        if getattr(layer, "_packed_compiled", False):
            layer._compiled_call_impl = None
            layer._packed_compiled = False


def sync_packed_layers(family, device: torch.device) -> None:
    """Compile or uncompile the decoder layers as ``use_compiled_layers`` says (a family without ``decoder_layers``
    has nothing to change)."""
    if use_compiled_layers(family, device):
        compile_packed_layers(family)
    elif isinstance(family, LayeredModel):
        uncompile_packed_layers(family)
