"""FlashAttention varlen on the flat packed row (``muffin.fast.packing``): the row's groups cut into causal query
runs over gathered keys, so no tile needs a mask; ``segment_attention_ref`` computes the same with a dense mask on
any device (the tests' path)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from utils.cuda import to_device

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: FlexAttention is used
    varlen_attn = None

_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()


@dataclass
class VarlenPlan:
    """The runs of one flat row: queries ``[cu_q[i], cu_q[i+1])`` of the row attend, causally aligned to the
    bottom-right, to keys ``k_index[cu_k[i]:cu_k[i+1]]`` of the row."""

    cu_q: torch.Tensor  # (R + 1,) int32
    cu_k: torch.Tensor  # (R + 1,) int32
    k_index: torch.Tensor  # (cu_k[-1],) int64: the row position of each gathered key
    max_q: int
    max_k: int

    def to(self, device: torch.device) -> VarlenPlan:
        return VarlenPlan(
            to_device(self.cu_q, device),
            to_device(self.cu_k, device),
            to_device(self.k_index, device),
            self.max_q,
            self.max_k,
        )


def varlen_plan(doc: torch.Tensor, seg: torch.Tensor) -> VarlenPlan:
    """The plan of a flat row from each token's group (``doc``) and segment (``seg``), both (T,) on the CPU.

    The row holds groups end to end: each group's prefix (segment 0), then its branches (segments 1, 2, ...), each
    contiguous, padding (segment -1) only at the end. A branch sees its group's prefix and itself, causally, so the
    row is a set of causal problems with contiguous queries: ``[prefix, branch_1]`` is one ordinary causal sequence;
    each further branch j is a query run over the keys ``[prefix, branch_j]``, causal aligned to the bottom-right
    (FlashAttention's convention when there are fewer queries than keys), its prefix's keys repeated in
    ``k_index``; the tail padding is one more sequence (its outputs are never read).
    """
    T = int(doc.shape[0])
    bad = ValueError(f"flat row of {T} tokens is not laid out as groups of [prefix, branches], padding last")
    new = torch.ones(T, dtype=torch.bool)
    new[1:] = (doc[1:] != doc[:-1]) | (seg[1:] != seg[:-1])
    starts = torch.nonzero(new).flatten().tolist()
    ends = starts[1:] + [T]
    spans = list(zip(doc[starts].tolist(), seg[starts].tolist(), starts, ends))  # (group, segment, start, end)
    runs: list[tuple[int, list[tuple[int, int]]]] = []  # (query end, key ranges); queries tile the row in order
    seen_docs: set[int] = set()
    i = 0
    while i < len(spans):
        d, s, a, b = spans[i]
        if s < 0:  # tail padding: one run over itself
            if i != len(spans) - 1:
                raise bad
            runs.append((b, [(a, b)]))
            break
        if d in seen_docs:
            raise bad
        seen_docs.add(d)
        prefix = (a, b) if s == 0 else (a, a)
        i += s == 0
        seen: set[int] = set()
        while i < len(spans) and spans[i][0] == d:
            _, s, a, b = spans[i]
            if s <= 0 or s in seen:
                raise bad
            seen.add(s)
            # [prefix, branch_1] is one causal sequence; a further branch sees [prefix, itself]
            runs.append((b, [(prefix[0], b)] if len(seen) == 1 else [prefix, (a, b)]))
            i += 1
        if not seen:  # a group with no branch: its prefix alone
            runs.append((prefix[1], [prefix]))
    cu_q, cu_k, index = [0], [0], []
    for q_end, ranges in runs:
        cu_q.append(q_end)
        index += [torch.arange(a, b) for a, b in ranges]
        cu_k.append(cu_k[-1] + sum(b - a for a, b in ranges))
    if cu_q[-1] != T:
        raise bad
    q_len = [b - a for a, b in zip(cu_q, cu_q[1:])]
    k_len = [b - a for a, b in zip(cu_k, cu_k[1:])]
    return VarlenPlan(
        torch.tensor(cu_q, dtype=torch.int32),
        torch.tensor(cu_k, dtype=torch.int32),
        torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
        max(q_len, default=0),
        max(k_len, default=0),
    )


def varlen_supported(query: torch.Tensor) -> bool:
    """Whether torch's FlashAttention varlen kernel can run these queries (CUDA, fp16/bf16, head dim <= 256)."""
    return (
        varlen_attn is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
    )


def segment_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: VarlenPlan, scale: float | None = None
) -> torch.Tensor:
    """Attention of the flat row's queries (T, H, D) over its keys and values (T, Hkv, D) along ``plan``: (T, H, D).
    FlashAttention varlen where ``varlen_supported``; off CUDA ``segment_attention_ref`` (tests); on CUDA otherwise
    an error naming the cause (the reference's memory grows with the square of the row)."""
    if not varlen_supported(query):
        if query.is_cuda:
            raise ValueError(
                f"FlashAttention varlen cannot run {query.dtype} queries of head size {query.shape[-1]} "
                f"(torch {torch.__version__}; it needs fp16/bf16, head size <= 256 and a multiple of 8, torch >= 2.9): "
                "set family.fast.packed_attention = 'flex'"
            )
        return segment_attention_ref(query, key, value, plan, scale)
    k, v = key[plan.k_index], value[plan.k_index]
    if k.shape[1] != query.shape[1] and "enable_gqa" not in _VARLEN_PARAMS:
        rep = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kwargs: dict = {"scale": scale}
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.12: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:  # torch 2.9-2.11
        kwargs["is_causal"] = True
    if k.shape[1] != query.shape[1] and "enable_gqa" in _VARLEN_PARAMS:
        kwargs["enable_gqa"] = True
    return varlen_attn(query, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, **kwargs)


def segment_attention_ref(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: VarlenPlan, scale: float | None = None
) -> torch.Tensor:
    """``segment_attention`` as one ``scaled_dot_product_attention`` over the gathered keys with the explicit
    (T, cu_k[-1]) mask of the runs (any device and dtype; differentiable; memory quadratic: for tests)."""
    dev = query.device
    cu_q, cu_k = plan.cu_q.to(dev, torch.long), plan.cu_k.to(dev, torch.long)
    index = plan.k_index.to(dev)
    qi, ki = torch.arange(query.shape[0], device=dev), torch.arange(index.shape[0], device=dev)
    q_run = torch.searchsorted(cu_q, qi, right=True) - 1
    k_run = torch.searchsorted(cu_k, ki, right=True) - 1
    # causal, aligned to the bottom-right corner of each run: key j of the run sees query i iff j <= i + (nk - nq)
    q_from_end = cu_q[q_run + 1] - qi  # 1 for the run's last query
    k_from_end = cu_k[k_run + 1] - ki
    mask = (q_run[:, None] == k_run[None]) & (k_from_end[None] >= q_from_end[:, None])
    k, v = key[index].transpose(0, 1), value[index].transpose(0, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[0] != query.shape[1]
    )
    return out.transpose(0, 1)
