"""Shared-prefix packing, the plan/run API: DPO log-probs, reference log-probs and yes/no scoring with each
group's image and prompt encoded once and its branches packed behind them (``muffin.fast.layout``), on the GPU as
one flat row (``muffin.fast.attention``, ``muffin.fast.compiled_layers``). A family takes this path when it
implements ``SharedPrefixModel``; others use the plain path, with the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from muffin.family import SharedPrefixModel
from muffin.fast.attention import flat_kernel, flat_layout, install_block_mask_attention, use_flat_row
from muffin.fast.compiled_layers import checkpointing_in_compiled_layers, sync_packed_layers
from muffin.fast.layout import LogpsPlan, PackedBatch, group_starts, plan_batch_logps, plan_next_token
from muffin.fast.logps import SequenceLogps, from_flat, target_logps, token_logps
from utils.cuda import to_device


def supports_packing(family: object) -> bool:
    """Whether ``family`` takes the shared-prefix path: it has the ``SharedPrefixModel`` hooks and its
    ``fast.packing`` is on. Anything else (a family without the hooks, a model behind a server) runs plain."""
    return isinstance(family, SharedPrefixModel) and family.fast.packing


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
        ids, positions, mask, where = flat_layout(packed, dev, family.pad_id, kernel)
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
    plan = plan_batch_logps(family, batch, group_starts(groups)) if packed else None
    return Prepared(batch, packed, plan)


def run_answer_logps(family, prep: Prepared, chunk: int = 1024) -> SequenceLogps:
    """Model side of ``answer_logps_auto``; results in group order, flattened."""
    if prep.packed:
        logps, mask = run_batch_logps(family, prep.batch, prep.plan, chunk)
    else:
        batch = prep.batch
        logps, mask = token_logps(
            family.forward(batch), batch["input_ids"].to(family.device), batch["answer_mask"].to(family.device)
        )
    return from_flat(logps[mask], mask.sum(-1).tolist())


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
    return Prepared(batch, True, *plan_next_token(family, batch, group_starts(groups)))


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
