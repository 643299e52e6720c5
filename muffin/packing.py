"""Shared-prefix packing: the fast path for DPO log-probs, reference log-probs and yes/no scoring.

A *group* is several token rows that share a prefix (the image and the prompt): the chosen and rejected answers of
a pair, or the yes/no questions about one image. We pack a group into ONE sequence ``[prefix, branch_1, branch_2,
...]`` with a block mask (each branch sees the prefix and itself, causally) and per-branch position ids that
continue the prefix, so every branch computes exactly what it would as its own sequence, while the image and the
prompt are encoded once and no padding is spent between branches.

Log-probs of target tokens are computed from hidden states with a chunked linear + log-softmax whose backward
recomputes logits chunk by chunk, so no (tokens x vocabulary) float32 tensor is ever kept.

On a GPU the packed groups of a batch go further: they are laid end to end in ONE row with no padding at all, so
neither the linear layers nor attention spend work on padding or on other groups. Attention on that row runs either
as FlashAttention varlen (``muffin.varlen``: ``[prefix, first branch]`` and each further branch over ``[prefix,
branch]`` as causal query runs, keys gathered) or as FlexAttention with a block-sparse mask (``BlockMask``) built
from each token's group and branch. ``"auto"`` takes varlen when the row's query runs average at least
``VARLEN_MIN_RUN`` tokens (pairs of answers), flex otherwise (many short yes/no questions per image). On the CPU
(where FlexAttention has no backward) each group keeps its own row with a dense boolean mask.
``family.packed_attention`` picks: ``"auto"`` (default: the flat row on CUDA when the LM runs sdpa or flex
attention), ``"varlen"``, ``"flex"`` or ``"dense"``. On the flat row the decoder layers run compiled
(``compile_packed_layers``; ``family.compile_layers = False`` keeps them eager).

A family supports the fast path when it implements ``SharedPrefixModel``; others use the plain path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit, Unsupported
from torch.utils.checkpoint import checkpoint

from muffin.dropout import seed_dropout, seeded_modules
from muffin.varlen import VarlenPlan, segment_attention, varlen_attn, varlen_plan
from utils.cuda import to_device

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch: the dense mask is used
    BlockMask = None

FLEX_BLOCK = 128  # FlexAttention's block size: the flat row is padded to a multiple of it
logger = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # torch.compile backend of the packed decoder layers ("eager" in CPU tests)
COMPILE_MIN_HIDDEN = 2048  # "auto" compiles the layers of LMs at least this wide (LLaVA 7B, OmniLMM, MiniCPM: 4096)
# "auto" runs a flat row with FlashAttention varlen when its query runs average at least this many tokens (DPO and
# reference pairs: answers of 130-330 tokens), else FlexAttention (yes/no questions of 10-25 tokens, which varlen
# would give a 128-row tile each); script/bench/bench_attention.py measures both
VARLEN_MIN_RUN = 128


@runtime_checkable
class SharedPrefixModel(Protocol):
    """Hooks a family exposes so that groups can be packed (see module docstring)."""

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


def attention_mask_for(mask: torch.Tensor, embeds: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """The packed boolean mask as the attention kernel wants it: eager attention adds the mask, so True/False
    become 0/-inf there; sdpa and others take the boolean mask as is."""
    if attn_implementation != "eager":
        return mask
    neg = torch.finfo(embeds.dtype).min
    return torch.zeros(mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(~mask, neg)


def supports_packing(family: object) -> bool:
    return isinstance(family, SharedPrefixModel) and getattr(family, "packing", True)


@dataclass
class PackedBatch:
    """Packed groups. ``index[g][j][p]`` is the packed column of position ``p`` of row ``j`` of group ``g``."""

    input_ids: torch.Tensor  # (G, L)
    position_ids: torch.Tensor  # (G, L)
    segment: torch.Tensor  # (G, L): -1 padding, 0 shared prefix, j+1 branch j
    index: list[list[list[int]]]
    prefix_len: list[int]

    def mask(self) -> torch.Tensor:
        """(G, 1, L, L) bool: query q attends key k iff k <= q, k is not padding, and k is in the prefix or q's branch."""
        seg = self.segment
        q, k = seg[:, :, None], seg[:, None, :]
        L = seg.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        allowed = causal & (k >= 0) & ((k == 0) | (k == q))
        # padding rows attend to themselves only, so no softmax sees an empty row (their outputs are never read)
        allowed |= torch.eye(L, dtype=torch.bool) & (q < 0)
        return allowed[:, None]


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        t = rows[0][i]
        if any(r[i] != t for r in rows[1:]):
            return i
    return n


def pack_groups(groups: Sequence[Sequence[Sequence[int]]], caps: Sequence[int], pad_id: int) -> PackedBatch:
    """Pack each group of token rows into one row: the shared prefix (at most ``caps[g]`` tokens), then each
    row's remaining tokens. Every branch keeps at least one token."""
    packed, positions, segments, index, prefix_lens = [], [], [], [], []
    for rows, cap in zip(groups, caps):
        k = min(common_prefix_len(rows), cap, min(len(r) for r in rows) - 1)
        ids, pos, seg = list(rows[0][:k]), list(range(k)), [0] * k
        grp_index = []
        for j, row in enumerate(rows):
            start = len(ids)
            ids.extend(row[k:])
            pos.extend(range(k, len(row)))
            seg.extend([j + 1] * (len(row) - k))
            grp_index.append(list(range(k)) + list(range(start, start + len(row) - k)))
        packed.append(ids)
        positions.append(pos)
        segments.append(seg)
        index.append(grp_index)
        prefix_lens.append(k)
    width = max(len(r) for r in packed)
    G = len(packed)
    input_ids = torch.full((G, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((G, width), dtype=torch.long)
    segment = torch.full((G, width), -1, dtype=torch.long)
    for g in range(G):
        n = len(packed[g])
        input_ids[g, :n] = torch.tensor(packed[g])
        position_ids[g, :n] = torch.tensor(positions[g])
        segment[g, :n] = torch.tensor(segments[g])
    return PackedBatch(input_ids, position_ids, segment, index, prefix_lens)


def _lm_config(family):
    """The language model's config (the text config of a multimodal one), or None."""
    config = getattr(getattr(family, "model", None), "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _lm_head_dim(family) -> int | None:
    config = _lm_config(family)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    heads = getattr(config, "num_attention_heads", None)
    return int(config.hidden_size) // int(heads) if heads and getattr(config, "hidden_size", None) else None


def _lm_attn_implementation(family) -> str | None:
    return getattr(_lm_config(family), "_attn_implementation", None)


PACKED_ATTENTION = ("auto", "flex", "varlen", "dense")


def use_flat_row(family, device: torch.device) -> bool:
    """Whether packed groups run as one flat row (FlexAttention or FlashAttention varlen; see the module
    docstring), not as one row per group with a dense mask."""
    mode = getattr(family, "packed_attention", "auto")
    if mode not in PACKED_ATTENTION:
        raise ValueError(f"family.packed_attention must be one of {PACKED_ATTENTION}, not {mode!r}")
    if mode == "dense" or BlockMask is None:
        return False
    impl = _lm_attn_implementation(family)
    if impl not in ("sdpa", "flex_attention"):
        if mode in ("flex", "varlen"):
            raise ValueError(f"packed_attention={mode!r} needs the LM to run sdpa or flex attention, not {impl!r}")
        return False
    return mode in ("flex", "varlen") or device.type == "cuda"


def flat_kernel(family, packed: PackedBatch, device: torch.device, dtype: torch.dtype) -> str:
    """``"varlen"`` or ``"flex"``: the attention kernel of this batch's flat row (``family.packed_attention``;
    ``"auto"`` = FlashAttention varlen on CUDA in fp16/bf16 when the row's query runs average at least
    ``VARLEN_MIN_RUN`` tokens, else FlexAttention). Forced ``"varlen"`` off CUDA runs ``segment_attention_ref``."""
    mode = getattr(family, "packed_attention", "auto")
    if mode in ("flex", "varlen"):
        return mode
    if varlen_attn is None or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "flex"
    head_dim = _lm_head_dim(family)
    if head_dim is not None and (head_dim > 256 or head_dim % 8):  # FlashAttention-2's head sizes
        return "flex"
    # runs: [prefix, first branch] per group plus one per further branch (see muffin.varlen)
    n_branches = packed.segment.amax(dim=1).clamp(min=1)
    n_tokens = int((packed.segment >= 0).sum())
    return "varlen" if n_tokens >= VARLEN_MIN_RUN * int(n_branches.sum()) else "flex"


_compiled_flex = None


def _refuse_unsupported(path: str, dropout: float, kwargs: dict) -> None:
    """The packed attention paths run no attention dropout, logit soft-capping or attention sinks."""
    if dropout:
        raise ValueError(f"the packed {path} path has no attention dropout: set attention_dropout=0")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"the packed {path} path supports no logit soft-capping or attention sinks")


def _flex_forward(module, query, key, value, block_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention function in transformers' signature that runs FlexAttention with a ``BlockMask``."""
    global _compiled_flex
    _refuse_unsupported("FlexAttention", dropout, kwargs)
    if torch.compiler.is_compiling():  # inside a compiled decoder layer: traced into the layer's fused graph
        fn = flex_attention
    elif query.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        fn = _compiled_flex
    else:  # eager (unfused) flex attention: forward only, used by tests
        fn = flex_attention
    out = fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _varlen_forward(module, query, key, value, plan: VarlenPlan, scaling=None, dropout=0.0, **kwargs):
    """An attention function in transformers' signature that runs the flat row's query runs (``plan``) with
    FlashAttention varlen (``muffin.varlen.segment_attention``); query (1, H, T, D) -> output (1, T, H, D)."""
    _refuse_unsupported("varlen attention", dropout, kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D): views of the projections' layout
    return segment_attention(q, k, v, plan, scale=scaling)[None], None


if BlockMask is not None:

    class VarlenBlockMask(BlockMask):
        """What the decoder layers get as ``attention_mask`` on the varlen flat path: a minimal ``BlockMask`` of the
        row's shape (transformers passes 4-D masks through untouched) that carries the ``VarlenPlan``."""

        plan: VarlenPlan

        @classmethod
        def of(cls, plan: VarlenPlan, T: int, device: torch.device) -> VarlenBlockMask:
            one = torch.ones(1, 1, 1, dtype=torch.int32, device=device)
            mask = cls.from_kv_blocks(
                one, torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device), seq_lengths=(T, T)
            )
            mask.plan = plan.to(device)
            return mask

else:  # pragma: no cover
    VarlenBlockMask = None


def use_compiled_layers(family, device: torch.device) -> bool:
    """Whether the flat row runs the decoder layers compiled (``family.compile_layers``: ``"auto"``,
    the default, = on CUDA for a family that lists its ``decoder_layers()`` and whose LM is at least
    ``COMPILE_MIN_HIDDEN`` wide (every released checkpoint; the tiny world models would pay the compilation in
    each stage's process for no measurable gain); ``True``; ``False``)."""
    mode = getattr(family, "compile_layers", "auto")
    if mode not in ("auto", True, False):
        raise ValueError(f"family.compile_layers must be 'auto', True or False, not {mode!r}")
    if mode is False or not hasattr(family, "decoder_layers"):
        return False
    model = getattr(family, "model", None)
    if model is not None and any(hasattr(p, "ds_id") for p in model.parameters()):
        return False  # ZeRO-3 gathers partitioned weights in hooks that a compiled graph would skip
    if mode is True:
        return True
    return device.type == "cuda" and _lm_hidden_size(family) >= COMPILE_MIN_HIDDEN


def _lm_hidden_size(family) -> int:
    return int(getattr(_lm_config(family), "hidden_size", 0) or 0)


def compile_packed_layers(family) -> None:
    """Run each decoder layer through ``torch.compile`` (dynamic shapes) whenever it is called with a ``BlockMask``
    (the packed flat row); every other call (generation, the plain path) stays eager. Idempotent.

    Compiling fuses what the layer does between its matrix products (RMSNorm, rotary embedding, SiLU gate, LoRA
    dropout, residual adds, casts) and cuts kernel launches: on an H200, a 7B LoRA DPO step at batch 8 went from
    978 to 799 ms and the reference stage from 44.9 to 55.3 pairs/s (docs/PERFORMANCE.md, run 6). A layer that is
    gradient-checkpointed is compiled with the checkpoint inside (``checkpointing_in_compiled_layers``): the forward
    saves only the layer's inputs and the backward graph recomputes what it needs, fused with the backward kernels,
    instead of running the whole compiled forward again. LoRA dropout takes its masks from a per-call seed
    (``muffin.dropout``), so the recomputation needs no random numbers. The first batches pay the compilation (20-60 s
    for a 7B model); later shapes reuse it (dynamic shapes). ``family.compile_layers = False`` turns it off.
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
                "family.compile_layers = False does the same for every layer)",
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
    if not torch.is_grad_enabled() or not hasattr(family, "decoder_layers"):
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
            "gradient_checkpointing_kwargs %s are not applied to them (family.compile_layers = False applies them)",
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
    elif hasattr(family, "decoder_layers"):
        uncompile_packed_layers(family)


def install_block_mask_attention() -> None:
    """Let transformers' ``sdpa`` attention take a ``BlockMask``: such calls go to FlexAttention (or, for a
    ``VarlenBlockMask``, to FlashAttention varlen), all others to the original sdpa function unchanged (so models
    loaded with sdpa need no reload). ``flex_attention`` is wrapped likewise for ``VarlenBlockMask``. Idempotent."""
    from transformers import AttentionInterface

    for name, flex_for_block_masks in (("sdpa", True), ("flex_attention", False)):
        base = AttentionInterface._global_mapping.get(name)
        if base is not None and not getattr(base, "_takes_block_mask", False):
            AttentionInterface.register(name, _packed_routing(base, flex_for_block_masks))


def _packed_routing(base, flex_for_block_masks: bool):
    """``base`` (a transformers attention function) with the flat row's masks routed: a ``VarlenBlockMask`` to
    FlashAttention varlen, with ``flex_for_block_masks`` any other ``BlockMask`` to our FlexAttention call."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        if isinstance(attention_mask, VarlenBlockMask):
            return _varlen_forward(module, query, key, value, attention_mask.plan, **kwargs)
        if flex_for_block_masks and isinstance(attention_mask, BlockMask):
            return _flex_forward(module, query, key, value, attention_mask, **kwargs)
        return base(module, query, key, value, attention_mask, **kwargs)

    attention._takes_block_mask = True
    return attention


def _allowed_intervals(doc: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each query's allowed keys in the flat row as two half-open intervals ``[a1, b1) U [a2, b2)`` (each (T,)).

    Relies on the layout of ``_flat_layout``: each doc is contiguous, its prefix (segment 0) first and then its
    branches (segments 1, 2, ...) each contiguous; padding (doc and segment -1) only at the end. A prefix query q
    sees ``[doc_start, q]``; a branch query sees ``[doc_start, prefix_end) U [branch_start, q]``; padding sees
    itself only. Empty intervals have ``a == b``.
    """
    T = doc.shape[0]
    i = torch.arange(T, device=doc.device)
    zero = torch.zeros((), dtype=i.dtype, device=doc.device)
    new_doc = torch.ones(T, dtype=torch.bool, device=doc.device)
    new_doc[1:] = doc[1:] != doc[:-1]
    new_seg = new_doc.clone()
    new_seg[1:] |= seg[1:] != seg[:-1]
    doc_start = torch.where(new_doc, i, zero).cummax(0).values
    seg_start = torch.where(new_seg, i, zero).cummax(0).values
    # one past the last prefix token seen so far; below doc_start when the doc has no prefix (prefix_len == 0)
    prefix_end = torch.maximum(torch.where(seg == 0, i + 1, zero).cummax(0).values, doc_start)
    pad, branch = seg < 0, seg > 0
    a1 = torch.where(pad, i, doc_start)
    b1 = torch.where(branch, prefix_end, i + 1)
    a2 = torch.where(branch, seg_start, zero)
    b2 = torch.where(branch, i + 1, zero)
    return a1, b1, a2, b2


def _block_pair_counts(intervals: Sequence[torch.Tensor], block: int) -> torch.Tensor:
    """(n_q_blocks, n_kv_blocks) int64: the number of allowed (q, k) pairs in each block tile, from the per-query
    intervals ``[a1, b1) U [a2, b2) ...`` (disjoint) of ``_allowed_intervals``, in O(T + (T / block)^2).

    The overlap of ``[a, b)`` with kv block j is ``F(b, j) - F(a, j)`` with ``F(x, j) = clamp(x - j * block, 0,
    block)`` = ``block`` if ``x // block > j``, ``x % block`` if ``x // block == j``, else 0. Summed over the queries
    of a q block, it needs per (q block, x // block) only the number of endpoints and the sum of their ``x % block``
    (signed: + for ends, - for starts), then a suffix sum over the kv blocks.
    """
    T = intervals[0].shape[0]
    nq, nk = T // block, -(-T // block)
    dev = intervals[0].device
    qb = (torch.arange(T, device=dev) // block).repeat(len(intervals))
    x = torch.cat(list(intervals))
    sign = torch.ones(len(intervals), T, dtype=torch.long, device=dev)
    sign[0::2] = -1  # starts a count negatively, ends positively
    sign = sign.flatten()
    cnt = torch.zeros(nq, nk + 1, dtype=torch.long, device=dev)  # x // block can be nk (x == T)
    rem = torch.zeros(nq, nk + 1, dtype=torch.long, device=dev)
    cnt.index_put_((qb, x // block), sign, accumulate=True)
    rem.index_put_((qb, x // block), sign * (x % block), accumulate=True)
    above = cnt.flip(-1).cumsum(-1).flip(-1)[:, 1:]  # endpoints in kv blocks > j
    return block * above + rem[:, :nk]


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nq, nk) bool -> BlockMask's (1, 1, nq) counts and (1, 1, nq, nk) indices, int32: each row's set blocks
    first in ascending order, then the others in ascending order (what ``create_block_mask`` produces)."""
    nk = blocks.shape[-1]
    j = torch.arange(nk, device=blocks.device)
    order = torch.argsort(torch.where(blocks, j, j + nk), dim=-1)
    return blocks.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]


def _doc_block_mask(doc: torch.Tensor, seg: torch.Tensor, mask_mod, block: int = FLEX_BLOCK):
    """The BlockMask of ``create_block_mask(mask_mod, 1, None, T, T, BLOCK_SIZE=block)`` for the flat layout's
    ``mask_mod``, built from the per-query key intervals (``_allowed_intervals``) without any (T, T) tensor."""
    T = doc.shape[0]
    counts = _block_pair_counts(_allowed_intervals(doc, seg), block)
    full = counts == block * block
    partial = (counts > 0) & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T)
    )


def flat_doc_seg(packed: PackedBatch, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's group (``doc``) and segment (``seg``) in the flat row of ``packed`` (its groups end to end,
    padding dropped) of length ``T`` >= its tokens, on the CPU; the tail is padding (-1 in both)."""
    keep = packed.segment >= 0
    n = int(keep.sum())
    doc = torch.full((T,), -1, dtype=torch.long)
    seg = torch.full((T,), -1, dtype=torch.long)
    doc[:n] = torch.arange(packed.segment.shape[0])[:, None].expand_as(keep)[keep]
    seg[:n] = packed.segment[keep]
    return doc, seg


def flat_mask_mod(doc: torch.Tensor, seg: torch.Tensor):
    """The flat row's FlexAttention ``mask_mod``: query q sees key k of its own group at or before it that is in the
    prefix or in q's branch; padding sees itself only."""

    def mask_mod(b, h, q, k):
        same = (doc[q] == doc[k]) & (k <= q) & (seg[k] >= 0) & ((seg[k] == 0) | (seg[k] == seg[q]))
        return same | ((q == k) & (seg[q] < 0))

    return mask_mod


def _flat_layout(packed: PackedBatch, dev: torch.device, pad_id: int, kernel: str = "flex"):
    """The groups of ``packed`` end to end in one row (padding dropped; for ``kernel="flex"`` the tail padded to
    ``FLEX_BLOCK``): its ids, positions, mask (a ``BlockMask``, or for ``"varlen"`` a ``VarlenBlockMask``), and
    ``where`` (G, L) = the flat column of each packed column (pads -> the last column)."""
    keep = packed.segment >= 0
    n = int(keep.sum())
    T = n if kernel == "varlen" else -(-n // FLEX_BLOCK) * FLEX_BLOCK
    doc, seg = flat_doc_seg(packed, T)
    ids = torch.full((T,), pad_id, dtype=torch.long)
    pos = torch.zeros(T, dtype=torch.long)
    ids[:n] = packed.input_ids[keep]
    pos[:n] = packed.position_ids[keep]
    where = torch.full(keep.shape, T - 1, dtype=torch.long)
    where[keep] = torch.arange(n)
    if kernel == "varlen":
        mask = VarlenBlockMask.of(varlen_plan(doc, seg), T, dev)
    else:
        doc, seg = to_device(doc, dev), to_device(seg, dev)
        # block structure from each query's (at most two) key intervals: O(T + (T/128)^2), no (T, T) evaluation of
        # mask_mod (which FlexAttention still applies inside the partial blocks)
        mask = _doc_block_mask(doc, seg, flat_mask_mod(doc, seg), FLEX_BLOCK)
    return to_device(ids[None], dev), to_device(pos[None], dev), mask, to_device(where, dev)


def packed_hidden(
    family: SharedPrefixModel, packed: PackedBatch, features: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """Hidden states (G, L, H) of packed groups; ``features[g]`` replaces the image tokens of group g's prefix."""
    head = family.output_head()
    dev = head.weight.device
    flat = use_flat_row(family, dev)
    if flat:
        install_block_mask_attention()
        sync_packed_layers(family, dev)
        kernel = flat_kernel(family, packed, dev, head.weight.dtype)
        ids, positions, mask, where = _flat_layout(packed, dev, family.pad_id, kernel)
    else:
        ids, positions, mask = (to_device(t, dev) for t in (packed.input_ids, packed.position_ids, packed.mask()))
    emb = family.embed_tokens(ids)
    feats = [f for f in features if f is not None]
    if feats:
        image_feats = torch.cat(feats).to(emb.dtype)
        # the image tokens' places, found on the host: a mask on the GPU would make the host wait for it
        host_ids = packed.input_ids[packed.segment >= 0][None] if flat else packed.input_ids
        places = torch.nonzero(host_ids == family.image_token_id, as_tuple=True)
        if places[0].numel() != image_feats.shape[0]:
            raise ValueError(
                f"packed batch has {places[0].numel()} image tokens but {image_feats.shape[0]} image features"
            )
        emb = emb.index_put(tuple(to_device(p, dev) for p in places), image_feats)
    with checkpointing_in_compiled_layers(family) if flat else contextlib.nullcontext():
        hidden = family.decoder_hidden(emb, mask, positions)
    return hidden[0][where] if flat else hidden


class _ChunkedLogps(torch.autograd.Function):
    """log_softmax(h @ W.T)[label] in chunks of rows; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse_all = torch.empty_like(out)
        for s in range(0, h.shape[0], chunk):
            logits = h[s : s + chunk] @ weight.T  # (n, V) in the model dtype
            lse = torch.logsumexp(logits.float(), -1)
            out[s : s + chunk] = logits.gather(-1, labels[s : s + chunk, None]).squeeze(-1).float() - lse
            lse_all[s : s + chunk] = lse
        ctx.save_for_backward(h, weight, labels, lse_all)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        h, weight, labels, lse_all = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s : s + ctx.chunk]
            g = grad_out[s : s + ctx.chunk].float()
            probs = torch.exp((hc @ weight.T).float() - lse_all[s : s + ctx.chunk, None])  # (n, V)
            grad_logits = -g[:, None] * probs
            grad_logits.scatter_add_(-1, labels[s : s + ctx.chunk, None], g[:, None])
            if need_h:
                grad_h[s : s + ctx.chunk] = (grad_logits.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w += grad_logits.T @ hc.float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def target_logps(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(label | hidden) for rows of ``hidden`` (N, H) -> (N,) float32, never materialising all logits.

    Falls back to calling ``head`` (chunked, autograd through it) when its weight is sharded away (ZeRO-3) or the
    head has a bias.
    """
    w = head.weight
    if head.bias is None and w.dim() == 2 and w.shape[1] == hidden.shape[-1]:
        return _ChunkedLogps.apply(hidden, w, labels, chunk)
    outs = []
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk])
        outs.append(
            logits.gather(-1, labels[s : s + chunk, None]).squeeze(-1).float() - torch.logsumexp(logits.float(), -1)
        )
    return torch.cat(outs)


@dataclass
class SequenceLogps:
    """Differentiable answer log-probs of N samples: per-token (list of (n_i,) tensors), sums and means (N,)."""

    per_token: list[torch.Tensor]
    sums: torch.Tensor
    means: torch.Tensor


def _rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Token rows of a right-padded ``encode`` batch, padding removed."""
    return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def _from_flat(flat: torch.Tensor, counts: list[int]) -> SequenceLogps:
    per_token = list(torch.split(flat, counts))
    sums = torch.stack([t.sum() for t in per_token])
    means = sums / torch.tensor(counts, device=flat.device).clamp(min=1)
    return SequenceLogps(per_token, sums, means)


@dataclass
class LogpsPlan:
    """The CPU side of ``packed_batch_logps``: the packed groups and, for every answer token, where its hidden state
    sits (group, packed column), its label, and where its log-prob goes in the (N, T-1) output."""

    packed: PackedBatch
    image_rows: list[int]  # the row whose image each group uses (its first row)
    g_idx: torch.Tensor
    col: torch.Tensor
    labels: torch.Tensor
    out_row: torch.Tensor
    out_col: torch.Tensor
    shape: tuple[int, int]


def plan_batch_logps(family, batch: dict[str, torch.Tensor], groups: Sequence[Sequence[int]]) -> LogpsPlan:
    """Pack the rows of an encoded batch by ``groups`` and index its answer tokens (CPU only, no model call)."""
    rows = _rows(batch)
    amask = [m[a.bool()].tolist() for m, a in zip(batch["answer_mask"], batch["attention_mask"])]
    grouped_rows = [[rows[r] for r in g] for g in groups]
    caps = [min(amask[r].index(True) if True in amask[r] else len(amask[r]) for r in g) for g in groups]
    packed = pack_groups(grouped_rows, caps, pad_id=family.pad_id)
    g_idx, col, labels, out_row, out_col = [], [], [], [], []
    for gi, g in enumerate(groups):
        for j, r in enumerate(g):
            row, am, index = rows[r], amask[r], packed.index[gi][j]
            pos = [p for p in range(1, len(row)) if am[p]]
            g_idx += [gi] * len(pos)
            col += [index[p - 1] for p in pos]
            labels += [row[p] for p in pos]
            out_row += [r] * len(pos)
            out_col += [p - 1 for p in pos]  # right padding: position p predicted at column p-1
    shape = (batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return LogpsPlan(
        packed,
        [g[0] for g in groups],
        as_long(g_idx),
        as_long(col),
        as_long(labels),
        as_long(out_row),
        as_long(out_col),
        shape,
    )


def run_batch_logps(
    family, batch: dict[str, torch.Tensor], plan: LogpsPlan, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model side of ``packed_batch_logps`` for a plan made by ``plan_batch_logps`` from the same batch."""
    hidden = packed_hidden(family, plan.packed, family.image_features(batch, plan.image_rows))  # (G, L, H)
    dev = hidden.device
    h = hidden[to_device(plan.g_idx, dev), to_device(plan.col, dev)]  # (N_tokens, H)
    flat = target_logps(h, family.output_head(), to_device(plan.labels, dev), chunk)
    r_t, c_t = to_device(plan.out_row, dev), to_device(plan.out_col, dev)
    logps = torch.zeros(plan.shape, dtype=torch.float32, device=dev).index_put((r_t, c_t), flat)
    mask = torch.zeros(plan.shape, dtype=torch.bool, device=dev).index_put(
        (r_t, c_t), torch.ones_like(flat, dtype=torch.bool)
    )
    return logps, mask


def packed_batch_logps(
    family, batch: dict[str, torch.Tensor], groups: Sequence[Sequence[int]], chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token answer log-probs of an already encoded (right-padded) batch, computed with its rows packed.

    Args:
        batch: ``family.encode`` output (``input_ids``, ``attention_mask``, ``answer_mask``, vision inputs).
        groups: row indices that share image and prompt (e.g. ``[[0, B], [1, B + 1], ...]`` for a pair batch of
            chosen rows then rejected rows); every row must appear in exactly one group.
    Returns:
        logps (N, T-1) float32, zero off the answer, and mask (N, T-1) bool: the layout of
        ``muffin.inference.token_logps`` on the plain batch, so callers can swap the two paths.
    """
    return run_batch_logps(family, batch, plan_batch_logps(family, batch, groups), chunk)


def _group_starts(groups: Sequence[Sequence]) -> list[list[int]]:
    """Row indices of each group's samples once the groups are flattened in order."""
    out, start = [], 0
    for g in groups:
        out.append(list(range(start, start + len(g))))
        start += len(g)
    return out


@dataclass
class Prepared:
    """A batch encoded (and, on the packed path, planned) on the CPU, ready for the model: what
    ``prepare_answer_logps`` / ``prepare_next_token`` return, so the next batch can be prepared while the GPU runs
    this one (``muffin.inference.prefetched``)."""

    batch: dict[str, torch.Tensor]
    packed: bool
    plan: LogpsPlan | PackedBatch | None = None
    rows: list[list[int]] | None = None  # next-token read-out: each group's token rows


def prepare_answer_logps(family, groups: Sequence[Sequence], packed: bool | None = None) -> Prepared:
    """CPU side of ``answer_logps_auto``: encode the groups' samples and plan the packed batch."""
    if packed is None:
        packed = supports_packing(family)
    batch = family.encode([s for g in groups for s in g])
    plan = plan_batch_logps(family, batch, _group_starts(groups)) if packed else None
    return Prepared(batch, packed, plan)


def run_answer_logps(family, prep: Prepared, chunk: int = 1024) -> SequenceLogps:
    """Model side of ``answer_logps_auto``; results in group order, flattened."""
    from muffin.inference import token_logps

    if prep.packed:
        logps, mask = run_batch_logps(family, prep.batch, prep.plan, chunk)
    else:
        batch = prep.batch
        logps, mask = token_logps(
            family.forward(batch), batch["input_ids"].to(family.device), batch["answer_mask"].to(family.device)
        )
    return _from_flat(logps[mask], mask.sum(-1).tolist())


def plain_answer_logps(family, samples: Sequence) -> SequenceLogps:
    """Reference path: every sample as its own sequence, full logits (what the original and TRL do)."""
    return run_answer_logps(family, prepare_answer_logps(family, [[s] for s in samples], packed=False))


def packed_answer_logps(family, groups: Sequence[Sequence], chunk: int = 1024) -> SequenceLogps:
    """Answer log-probs of every sample of every group (samples of a group share image and question), packed.

    Results are in group order, flattened: group 0's samples, then group 1's, ...
    """
    return run_answer_logps(family, prepare_answer_logps(family, groups, packed=True), chunk)


def answer_logps_auto(family, groups: Sequence[Sequence], packed: bool | None = None) -> SequenceLogps:
    """Packed when the family supports it (and ``packed`` is not False), else the plain path; same results."""
    return run_answer_logps(family, prepare_answer_logps(family, groups, packed))


def prepare_next_token(family, groups: Sequence[Sequence], packed: bool | None = None) -> Prepared:
    """CPU side of the next-token read-out: encode the prompts (left padded) and, packed, pack each group's rows
    behind their common prefix (the image and the shared prompt)."""
    if packed is None:
        packed = supports_packing(family)
    batch = family.encode([s for g in groups for s in g], for_generation=True)
    if not packed:
        return Prepared(batch, False)
    return Prepared(batch, True, *plan_next_token(family, batch, _group_starts(groups)))


def plan_next_token(
    family, batch: dict[str, torch.Tensor], groups: Sequence[Sequence[int]]
) -> tuple[PackedBatch, list[list[list[int]]]]:
    """Each group's prompt rows of a (left-padded) ``encode`` batch packed behind their common prefix (CPU only);
    returns the packed batch and the groups' token rows."""
    rows = _rows(batch)
    grouped_rows = [[rows[i] for i in idx] for idx in groups]
    return pack_groups(grouped_rows, [len(r[0]) for r in grouped_rows], pad_id=family.pad_id), grouped_rows


def run_next_token(family, prep: Prepared) -> torch.Tensor:
    """Next-token logits (N, V), float32, of a batch made by ``prepare_next_token``."""
    if not prep.packed:
        return family.forward(prep.batch)[:, -1].float()  # left padded: the next token is predicted last
    grouped_rows, packed = prep.rows, prep.plan
    sizes = [len(g) for g in grouped_rows]
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    hidden = packed_hidden(family, packed, family.image_features(prep.batch, starts))
    g_idx = [g for g, n in enumerate(sizes) for _ in range(n)]
    col = [packed.index[g][j][len(grouped_rows[g][j]) - 1] for g, n in enumerate(sizes) for j in range(n)]
    dev = hidden.device
    h = hidden[to_device(torch.tensor(g_idx), dev), to_device(torch.tensor(col), dev)]  # (N, H)
    return family.output_head()(h).float()


def packed_next_token_logits(family, groups: Sequence[Sequence]) -> torch.Tensor:
    """Next-token logits (N, V), float32, after each prompt of groups whose samples share one image: the labeler's
    read-out with the image and the common prompt prefix encoded once per group, its questions packed behind it."""
    return run_next_token(family, prepare_next_token(family, groups, packed=True))
