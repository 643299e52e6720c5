"""Attention on the flat packed row: the kernel choice (FlashAttention varlen, FlexAttention or a dense mask),
FlexAttention's block mask built from per-query key intervals, and the routing of transformers' attention functions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from muffin.family import PACKED_ATTENTION
from muffin.fast.layout import PackedBatch, flat_doc_seg
from muffin.fast.varlen import VarlenPlan, segment_attention, varlen_attn, varlen_plan
from utils.cuda import to_device

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch: the dense mask is used
    BlockMask = None

FLEX_BLOCK = 128  # FlexAttention's block size: the flat row is padded to a multiple of it
logger = logging.getLogger(__name__)

# "auto" runs a flat row with FlashAttention varlen when its query runs average at least this many tokens (DPO and
# reference pairs: answers of 130-330 tokens), else FlexAttention (yes/no questions of 10-25 tokens, which varlen
# would give a 128-row tile each); script/bench/bench_attention.py measures both
VARLEN_MIN_RUN = 128


def attention_mask_for(mask: torch.Tensor, embeds: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """The packed boolean mask as the attention kernel wants it: eager attention adds the mask, so True/False
    become 0/-inf there; sdpa and others take the boolean mask as is."""
    if attn_implementation != "eager":
        return mask
    neg = torch.finfo(embeds.dtype).min
    return torch.zeros(mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(~mask, neg)


def lm_config(family):
    """The language model's config (the text config of a multimodal one), or None."""
    config = getattr(family.model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _lm_head_dim(family) -> int | None:
    config = lm_config(family)
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    heads = getattr(config, "num_attention_heads", None)
    return int(config.hidden_size) // int(heads) if heads and getattr(config, "hidden_size", None) else None


def _lm_attn_implementation(family) -> str | None:
    return getattr(lm_config(family), "_attn_implementation", None)


def use_flat_row(family, device: torch.device) -> bool:
    """Whether packed groups run as one flat row (FlexAttention or FlashAttention varlen; see the module
    docstring), not as one row per group with a dense mask."""
    mode = family.fast.packed_attention
    if mode not in PACKED_ATTENTION:
        raise ValueError(f"family.fast.packed_attention must be one of {PACKED_ATTENTION}, not {mode!r}")
    if mode == "dense" or BlockMask is None:
        return False
    impl = _lm_attn_implementation(family)
    if impl not in ("sdpa", "flex_attention"):
        if mode in ("flex", "varlen"):
            raise ValueError(f"packed_attention={mode!r} needs the LM to run sdpa or flex attention, not {impl!r}")
        return False
    return mode in ("flex", "varlen") or device.type == "cuda"


def flat_kernel(family, packed: PackedBatch, device: torch.device, dtype: torch.dtype) -> str:
    """``"varlen"`` or ``"flex"``: the attention kernel of this batch's flat row (``family.fast.packed_attention``;
    ``"auto"`` = FlashAttention varlen on CUDA in fp16/bf16 when the row's query runs average at least
    ``VARLEN_MIN_RUN`` tokens, else FlexAttention). Forced ``"varlen"`` off CUDA runs ``segment_attention_ref``."""
    mode = family.fast.packed_attention
    if mode in ("flex", "varlen"):
        return mode
    if varlen_attn is None or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "flex"
    head_dim = _lm_head_dim(family)
    if head_dim is not None and (head_dim > 256 or head_dim % 8):  # FlashAttention-2's head sizes
        return "flex"
    # runs: [prefix, first branch] per group plus one per further branch (see muffin.fast.varlen)
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
    FlashAttention varlen (``muffin.fast.varlen.segment_attention``); query (1, H, T, D) -> output (1, T, H, D)."""
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

    Relies on the layout of ``flat_layout``: each doc is contiguous, its prefix (segment 0) first and then its
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


def flat_mask_mod(doc: torch.Tensor, seg: torch.Tensor):
    """The flat row's FlexAttention ``mask_mod``: query q sees key k of its own group at or before it that is in the
    prefix or in q's branch; padding sees itself only."""

    def mask_mod(b, h, q, k):
        same = (doc[q] == doc[k]) & (k <= q) & (seg[k] >= 0) & ((seg[k] == 0) | (seg[k] == seg[q]))
        return same | ((q == k) & (seg[q] < 0))

    return mask_mod


def flat_layout(packed: PackedBatch, dev: torch.device, pad_id: int, kernel: str = "flex"):
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
