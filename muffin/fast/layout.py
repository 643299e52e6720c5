"""The CPU side of shared-prefix packing: groups of token rows packed behind their common prefix, and plans that
say where each answer token's log-prob is read. No model is called here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


def token_rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Token rows of a right-padded ``encode`` batch, padding removed."""
    return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


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
    rows = token_rows(batch)
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


def group_starts(groups: Sequence[Sequence]) -> list[list[int]]:
    """Row indices of each group's samples once the groups are flattened in order."""
    out, start = [], 0
    for g in groups:
        out.append(list(range(start, start + len(g))))
        start += len(g)
    return out


def plan_next_token(
    family, batch: dict[str, torch.Tensor], groups: Sequence[Sequence[int]]
) -> tuple[PackedBatch, list[list[list[int]]]]:
    """Each group's prompt rows of a (left-padded) ``encode`` batch packed behind their common prefix (CPU only);
    returns the packed batch and the groups' token rows."""
    rows = token_rows(batch)
    grouped_rows = [[rows[i] for i in idx] for idx in groups]
    return pack_groups(grouped_rows, [len(r[0]) for r in grouped_rows], pad_id=family.pad_id), grouped_rows
