"""Shi et al. (2021) warm-up regularisers against hand-computed values."""

import pytest
import torch

from acert.bounds import Interval
from acert.methods.warmup import relu_balance_loss, tightness_loss


def interval(lower, upper) -> Interval:
    return Interval.from_bounds(torch.tensor(lower), torch.tensor(upper))


def test_tightness_penalises_layers_that_widen_the_box():
    box = interval([[0.0, 0.0]], [[0.2, 0.2]])  # T0 = 0.1
    tight = interval([[-0.1, 0.0]], [[0.1, 0.2]])  # T = 0.1, T0/T = 1 >= τ: no penalty
    wide = interval([[-1.0, 0.0]], [[1.0, 0.6]])  # T = (1 + 0.3)/2 = 0.65, T0/T = 0.1538
    assert tightness_loss(box, [tight]).item() == 0.0
    expected = (0.5 - 0.1 / 0.65) / 0.5
    assert tightness_loss(box, [wide]).item() == pytest.approx(expected, rel=1e-5)
    assert tightness_loss(box, [tight, wide]).item() == pytest.approx(expected / 2, rel=1e-5)


def test_relu_balance_by_hand():
    # centres: active 1.0, 3.0 (l > 0); inactive -1.0 (u < 0); one unstable unit with centre 0
    pre = interval([[0.5, 2.0, -1.5, -1.0]], [[1.5, 4.0, -0.5, 1.0]])
    centre = torch.tensor([1.0, 3.0, -1.0, 0.0])
    r_mean = min(4.0 / 1.0, 1.0 / 4.0)  # ratio of sums of active and (minus) inactive centres
    deviation = (centre - centre.mean()) ** 2  # mean 0.75
    var_active, var_inactive = deviation[0] + deviation[1], deviation[2]
    r_var = min(var_active / var_inactive, var_inactive / var_active).item()
    expected = (max(0.5 - r_mean, 0) + max(0.5 - r_var, 0)) / 0.5
    assert relu_balance_loss([pre]).item() == pytest.approx(expected, rel=1e-5)


def test_relu_balance_is_zero_when_balanced_and_maximal_when_one_sided():
    balanced = interval([[0.5, -1.5]], [[1.5, -0.5]])  # centres +1 and -1
    assert relu_balance_loss([balanced]).item() == 0.0
    one_sided = interval([[0.5, 0.5]], [[1.5, 2.5]])  # no inactive unit: both ratios 0
    value = relu_balance_loss([one_sided])
    assert value.item() == pytest.approx(2.0)
    # finite gradients even at the degenerate ratios
    lower = torch.tensor([[0.5, 0.5]], requires_grad=True)
    relu_balance_loss([Interval.from_bounds(lower, lower + 1)]).backward()
    assert torch.isfinite(lower.grad).all()
