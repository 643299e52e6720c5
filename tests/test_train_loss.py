"""Preference-loss variants against numbers derived by hand (muffin/train/loss.py)."""

from __future__ import annotations

import math

import pytest
import torch

from muffin.train.loss import ddpo_token_weights, preference_loss, preference_losses, sequence_logps

# Two pairs. Pair 0: pi_c=-10, pi_r=-12, ref_c=ref_r=-11 -> h = (-10 + 12) - 0 = 2.
#            Pair 1: pi_c=-20, pi_r=-10, ref_c=ref_r=-10 -> h = -10.
PI_C, PI_R = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -10.0])
REF_C, REF_R = torch.tensor([-11.0, -10.0]), torch.tensor([-11.0, -10.0])


def _losses(loss_type: str, **kw: float) -> list[float]:
    return preference_losses(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type=loss_type, **kw).tolist()


def test_sigmoid_dpo_by_hand() -> None:
    """-log sigmoid(x) = log(1 + e^-x): beta*h = 0.2 -> log(1.8187308) = 0.5981389; beta*h = -1 -> log(1 + e) = 1.3132617."""
    assert _losses("sigmoid") == pytest.approx([0.5981389, 1.3132617], abs=1e-6)


def test_conservative_dpo_by_hand() -> None:
    """cDPO = (1-eps) log(1+e^-x) + eps log(1+e^x); since log(1+e^x) - log(1+e^-x) = x it equals DPO + eps*x.

    eps 0.1: 0.5981389 + 0.1*0.2 = 0.6181389; 1.3132617 + 0.1*(-1) = 1.2132617. eps 0 is plain DPO.
    """
    assert _losses("conservative", label_smoothing=0.1) == pytest.approx([0.6181389, 1.2132617], abs=1e-6)
    assert _losses("conservative", label_smoothing=0.0) == pytest.approx(_losses("sigmoid"), abs=1e-7)


def test_ipo_by_hand() -> None:
    """(h - 1/(2 beta))^2 with 1/(2*0.1) = 5: (2 - 5)^2 = 9, (-10 - 5)^2 = 225."""
    assert _losses("ipo") == pytest.approx([9.0, 225.0])


def test_hinge_by_hand() -> None:
    """max(0, 1 - beta h): 1 - 0.2 = 0.8 and 1 + 1 = 2; a pair with beta h >= 1 costs nothing."""
    assert _losses("hinge") == pytest.approx([0.8, 2.0])
    zero = preference_losses(
        torch.tensor([0.0]),
        torch.tensor([-20.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        beta=0.1,
        loss_type="hinge",
    )
    assert zero.item() == 0.0


def test_unknown_loss_type_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="Available: sigmoid, conservative, ipo, hinge"):
        _losses("dpo")


def test_rewards_and_sft_term_by_hand() -> None:
    """Rewards beta*(pi - ref): chosen 0.1*1 = 0.1 and 0.1*(-10) = -1; rejected 0.1*(-1) = -0.1 and 0.

    Total with SFT weight 0.5: mean DPO (0.5981389 + 1.3132617)/2 = 0.9557003, plus 0.5 * -mean(pi_c) = 0.5 * 15.
    """
    out = preference_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, sft_weight=0.5)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -1.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.0])
    assert out.sft.item() == pytest.approx(15.0)
    assert out.loss.item() == pytest.approx(0.9557003 + 7.5, abs=1e-6)
    assert preference_loss(PI_C, PI_R, REF_C, REF_R).loss.item() == pytest.approx(0.9557003, abs=1e-6)


def test_dpo_gradient_by_hand() -> None:
    """d/d pi_c of -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.1 / (1 + e^0.2) = -0.0450166; d/d pi_r is +."""
    pi_c, pi_r = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    preference_loss(pi_c, pi_r, torch.tensor([-11.0]), torch.tensor([-11.0])).loss.backward()
    expected = -0.1 / (1 + math.exp(0.2))
    assert pi_c.grad.item() == pytest.approx(expected, abs=1e-7)
    assert pi_r.grad.item() == pytest.approx(-expected, abs=1e-7)


def test_sequence_logps_sum_mean_and_weighted() -> None:
    """Tokens (-1, -2, -3, masked 7): sum -6, mean -2; weights (1, 5, 1, 9): -1 - 10 - 3 = -14 over weight 7 = -2."""
    per_token = torch.tensor([[-1.0, -2.0, -3.0, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    weights = torch.tensor([[1.0, 5.0, 1.0, 9.0]])
    assert sequence_logps(per_token, mask).item() == pytest.approx(-6.0)
    assert sequence_logps(per_token, mask, average=True).item() == pytest.approx(-2.0)
    assert sequence_logps(per_token, mask, weights).item() == pytest.approx(-14.0)
    assert sequence_logps(per_token, mask, weights, average=True).item() == pytest.approx(-2.0)


def test_ddpo_weights_mark_the_differing_tokens() -> None:
    """chosen (5 6 7 8) vs rejected (5 9 7 8 10): shared 5 and (7 8); 6, 9 and 10 differ and get gamma."""
    wc, wr = ddpo_token_weights([5, 6, 7, 8], [5, 9, 7, 8, 10], gamma=5.0)
    assert wc == [1.0, 5.0, 1.0, 1.0]
    assert wr == [1.0, 5.0, 1.0, 1.0, 5.0]
    assert ddpo_token_weights([1, 2], [3], gamma=1.0) == ([1.0, 1.0], [1.0])
