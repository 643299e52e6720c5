"""Pure preference losses for DPO training: DPO (sigmoid), conservative DPO, IPO, hinge, DDPO token weights, SFT.

Everything here is a function of tensors only (no model, no trainer) so that each variant is tested against numbers
derived by hand (tests/test_train_loss.py). Notation: ``pi_c``/``pi_r`` are the policy's log-probs of the chosen /
rejected answer, ``ref_c``/``ref_r`` the frozen reference's, and ``h = (pi_c - pi_r) - (ref_c - ref_r)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "conservative", "ipo", "hinge")


@dataclass
class PreferenceLoss:
    """Output of ``preference_loss``: the scalar to backpropagate and per-pair quantities for logging (all (B,))."""

    loss: torch.Tensor  # scalar: mean preference loss + sft_weight * sft term
    losses: torch.Tensor  # (B,) preference loss per pair, before the SFT term
    sft: torch.Tensor  # scalar: -mean(pi_c), the SFT term before its weight
    chosen_rewards: torch.Tensor  # (B,) beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (pi_r - ref_r), detached


def preference_losses(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair preference loss (B,) from sequence log-probs (B,) of policy and reference.

    - ``sigmoid``: DPO, Rafailov et al. 2023 Eq. 7: ``-log sigma(beta * h)``.
    - ``conservative``: cDPO (Mitchell 2023, label-smoothed DPO) with smoothing eps:
      ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``; eps = 0 is DPO.
    - ``ipo``: IPO, Azar et al. 2023 Eq. 17: ``(h - 1 / (2 beta))^2`` on whatever log-probs are passed in
      (TRL divides by the answer length first: pass averaged log-probs, ``use_average``, to match it).
    - ``hinge``: SLiC-HF, Zhao et al. 2023 Eq. 3 with the reference ratio: ``max(0, 1 - beta h)``.

    Args:
        pi_c, pi_r, ref_c, ref_r: (B,) sequence log-probs (summed, averaged or token-weighted, all the same way).
        beta: inverse temperature of the implicit reward (the paper uses 0.1).
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: eps of the conservative loss, in [0, 0.5).
    """
    h = (pi_c - pi_r) - (ref_c - ref_r)  # (B,)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "conservative":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown loss_type '{loss_type}'. Available: {', '.join(LOSS_TYPES)}.")


def preference_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> PreferenceLoss:
    """The training objective: ``mean(preference_losses) - sft_weight * mean(pi_c)``, plus the implicit rewards.

    The SFT term is the original RLAIF-V trainer's (``loss = DPO_weight * dpo - SFT_weight * policy_win_logp.mean()``):
    the negative chosen log-prob under the same reduction as the DPO term (summed by default).

    Example:
        >>> out = preference_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
        >>> round(out.loss.item(), 4)  # -log sigmoid(0.1 * 1) = log(1 + e^-0.1)
        0.6444
    """
    losses = preference_losses(
        pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
    sft = -pi_c.mean()
    loss = losses.mean() + sft_weight * sft if sft_weight else losses.mean()
    return PreferenceLoss(
        loss=loss,
        losses=losses,
        sft=sft.detach(),
        chosen_rewards=beta * (pi_c - ref_c).detach(),
        rejected_rewards=beta * (pi_r - ref_r).detach(),
    )


def sequence_logps(
    per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None, *, average: bool = False
) -> torch.Tensor:
    """Reduce per-token log-probs (B, L) to one number per sequence (B,).

    ``sum_t w_t m_t logp_t`` (``average=False``) or that divided by ``sum_t w_t m_t`` (``average=True``); ``w = 1``
    when ``weights`` is None. With DDPO weights this is RLHF-V's token-weighted log-prob (Yu et al. 2023, Eq. 5;
    the original's ``compute_weighted_logp``).
    """
    w = mask.to(per_token.dtype)
    if weights is not None:
        w = w * weights.to(per_token.dtype)
    total = (per_token * w).sum(-1)
    return total / w.sum(-1).clamp(min=1e-8) if average else total


def ddpo_token_weights(
    chosen: Sequence[int], rejected: Sequence[int], gamma: float
) -> tuple[list[float], list[float]]:
    """Per-token weights of two answers: ``gamma`` on tokens that differ between them, 1 on the shared ones.

    RLHF-V's DDPO up-weights the corrected segments of a human-corrected answer by gamma (5 in the paper). RLAIF-V
    pairs are two independent samples, so "corrected" is taken as "not part of a longest matching block" between the
    two token sequences (``difflib.SequenceMatcher`` without its junk heuristic, deterministic). ``gamma = 1`` gives
    all-ones weights, i.e. plain DPO.

    Args:
        chosen, rejected: answer token ids (answer tokens plus the end-of-turn token, as scored).
        gamma: weight of the differing tokens, >= 1 in practice.
    """
    wc, wr = [float(gamma)] * len(chosen), [float(gamma)] * len(rejected)
    matcher = difflib.SequenceMatcher(a=list(chosen), b=list(rejected), autojunk=False)
    for block in matcher.get_matching_blocks():
        wc[block.a : block.a + block.size] = [1.0] * block.size
        wr[block.b : block.b + block.size] = [1.0] * block.size
    return wc, wr
