"""Each pairwise reward loss against its docstring formula, computed independently with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpeft.alignment.reward_losses import REWARD_LOSSES, loss_parameters, pairwise_accuracy, reward_loss

C = np.array([1.5, -0.2, 0.3, 2.0, -1.0])
R = np.array([0.5, 0.4, 0.3, -1.0, 0.8])
D = C - R


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _huber(x, beta):
    return np.where(np.abs(x) < beta, 0.5 * x * x / beta, np.abs(x) - 0.5 * beta)


def _kl(eps):
    p = np.stack([_sigmoid(D), _sigmoid(-D)], axis=1)
    t = np.array([1 - eps, eps])
    terms = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1.0)) - np.log(p)), 0.0)
    return terms.sum(axis=1).mean()


def _cosine(m):
    c = D / (math.sqrt(2) * np.sqrt(C**2 + R**2))
    return np.mean(0.5 * (1 - c) + 0.5 * np.maximum(0, m - c))


# name, params, expected value by the docstring formula
CASES = [
    ("logsigmoid", {}, np.mean(-np.log(_sigmoid(D)))),
    ("bce", {}, np.mean(-np.log(_sigmoid(D)))),
    ("bce", {"label_smoothing": 0.2}, np.mean(-0.8 * np.log(_sigmoid(D)) - 0.2 * np.log(1 - _sigmoid(D)))),
    ("mse", {}, np.mean((D - 1.0) ** 2)),
    ("mse", {"margin": 0.5}, np.mean((D - 0.5) ** 2)),
    ("smooth_l1", {}, np.mean(_huber(D - 1.0, 1.0))),
    ("smooth_l1", {"margin": 2.0, "beta": 0.5}, np.mean(_huber(D - 2.0, 0.5))),
    ("hinge", {}, np.mean(np.maximum(0, 1 - D))),
    ("hinge", {"margin": 2.5}, np.mean(np.maximum(0, 2.5 - D))),
    ("kl", {}, _kl(0.1)),
    ("kl", {"label_smoothing": 0.0}, np.mean(-np.log(_sigmoid(D)))),
    ("cosine", {}, _cosine(1.0)),
    ("cosine", {"margin": 0.2}, _cosine(0.2)),
    ("triplet", {}, np.mean(np.maximum(0, np.abs(1 - C) - np.abs(1 - R) + 1))),
    ("triplet", {"anchor": 3.0, "margin": 0.5}, np.mean(np.maximum(0, np.abs(3 - C) - np.abs(3 - R) + 0.5))),
    ("focal", {}, np.mean(-0.25 * (1 - _sigmoid(D)) ** 2 * np.log(_sigmoid(D)))),
    ("focal", {"alpha": 1.0, "gamma": 0.0}, np.mean(-np.log(_sigmoid(D)))),
    ("dice", {}, 1 - (2 * _sigmoid(D).sum() + 1) / (_sigmoid(D).sum() + len(D) + 1)),
]


@pytest.mark.parametrize("name, params, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loss_matches_its_formula(name, params, expected):
    value = reward_loss(name, **params)(torch.tensor(C, dtype=torch.float64), torch.tensor(R, dtype=torch.float64))
    # triplet_margin_loss adds eps=1e-6 inside each distance, hence the absolute tolerance.
    assert float(value) == pytest.approx(float(expected), rel=1e-9, abs=1e-5)


def test_hand_computed_values_on_one_pair():
    # d = 2 - 0 = 2; by hand: hinge max(0, 1 - 2) = 0, mse (2 - 1)^2 = 1, smooth-L1 |1| - 0.5 = 0.5,
    # logsigmoid log(1 + e^-2) = 0.126928...
    c, r = torch.tensor([2.0]), torch.tensor([0.0])
    assert float(reward_loss("hinge")(c, r)) == 0.0
    assert float(reward_loss("mse")(c, r)) == pytest.approx(1.0)
    assert float(reward_loss("smooth_l1")(c, r)) == pytest.approx(0.5)
    assert float(reward_loss("logsigmoid")(c, r)) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


@pytest.mark.parametrize("name", list(REWARD_LOSSES))
def test_every_loss_widens_a_wrongly_ranked_gap(name):
    """One gradient step on a pair ranked the wrong way moves the gap towards the chosen completion."""
    chosen = torch.tensor([-0.3], requires_grad=True)
    rejected = torch.tensor([0.4], requires_grad=True)
    reward_loss(name)(chosen, rejected).backward()
    with torch.no_grad():
        step_gap = (chosen - 0.1 * chosen.grad) - (rejected - 0.1 * rejected.grad)
        assert float(step_gap) > float(chosen - rejected)


def test_unknown_name_and_parameter_list_the_valid_ones():
    with pytest.raises(ValueError, match="reward loss 'sigmoid' is unknown; valid: logsigmoid, bce, mse, smooth_l1, "
                                         "hinge, kl, cosine, triplet, focal, dice"):
        reward_loss("sigmoid")
    with pytest.raises(ValueError, match="has no parameter 'gamma'; valid: margin"):
        reward_loss("hinge", gamma=2.0)
    with pytest.raises(ValueError, match="expected a finite number"):
        reward_loss("hinge", margin=float("nan"))
    assert loss_parameters("focal") == {"alpha": 0.25, "gamma": 2.0}


def test_pairwise_accuracy_counts_strict_wins():
    assert pairwise_accuracy(torch.tensor(C), torch.tensor(R)) == pytest.approx(np.mean(C > R))  # tie counts wrong
