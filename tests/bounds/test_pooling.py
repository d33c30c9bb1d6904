"""Pooling kinds: max pooling's relaxation and backward step by hand, average pooling's
geometries (padding, strides, rectangles) on patches and against the exact verifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import acert.bounds as bounds
from acert.bounds import input_box, margin_bounds
from acert.bounds.crown import crown_margins
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import BackwardContext
from acert.bounds.kinds import walk
from acert.bounds.pooling import MAXPOOL2D
from acert.models import Normalize
from tests.kit.exact import exact_min_margins

pytestmark = pytest.mark.usefixtures("single_thread")


def test_max_pool_relaxation_by_hand():
    """Window 0 is decided (0.8 above every other upper bound), window 1 is not (two inputs
    may be the maximum): its upper line is the constant largest upper bound."""
    lower = torch.tensor([[[[0.8, 0.0, 0.1, 0.2], [0.1, 0.2, 0.5, 0.4]]]])
    upper = torch.tensor([[[[1.0, 0.3, 0.3, 0.6], [0.4, 0.5, 0.7, 0.9]]]])
    pool = nn.MaxPool2d(2)
    pre = Interval.from_bounds(lower, upper)
    relax = MAXPOOL2D.relaxer.relax(pool, pre)
    assert relax.index.tolist() == [[[0, 2]]]  # the largest lower bounds: 0.8, and 0.5 at (1, 2)
    assert relax.decided.tolist() == [[[1.0, 0.0]]]
    torch.testing.assert_close(relax.upper, torch.tensor([[[1.0, 0.9]]]))
    # the inputs that may be the maximum of the undecided window: upper bounds >= 0.5
    undecided = MAXPOOL2D.relaxer.undecided(pool, pre)
    expected = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    expected[0, 0, 1, 2] = expected[0, 0, 1, 3] = expected[0, 0, 0, 3] = True
    assert torch.equal(undecided, expected)


def test_max_pool_backward_step_by_hand(exact_arithmetic):
    """A positive coefficient goes to the chosen input (lower line); a negative one too where
    the window is decided, else it becomes the constant a·upper; overlapping windows add up."""
    pool = nn.MaxPool2d(2, stride=1)  # (1, 2, 3) -> (1, 1, 2): both windows share column 1
    lower = torch.tensor([[[[0.0, 0.9, 0.0], [0.1, 0.2, 0.5]]]])
    upper = lower + torch.tensor([[[[0.1, 0.05, 0.1], [0.1, 0.1, 0.6]]]])
    relax = MAXPOOL2D.relaxer.relax(pool, Interval.from_bounds(lower, upper))
    step = walk([pool])[0]
    ctx = BackwardContext(torch.tensor([0, 0]), None, (1, 2, 3), relax)
    A = torch.tensor([[[[[2.0, 3.0]]]], [[[[-2.0, -3.0]]]]])  # (Q=2, S=1, 1, 1, 2)
    A_in, bias = MAXPOOL2D.backward(step, A, torch.zeros(2, 1), ctx)
    # window 0 chooses (0, 1) = 0.9, decided; window 1 chooses (0, 1) too (0.9 > 0.5) but the
    # input at (1, 2) may reach 1.1: undecided, upper line the constant 1.1
    assert relax.decided.tolist() == [[[1.0, 0.0]]]
    expected = torch.zeros(2, 1, 1, 2, 3)
    expected[0, 0, 0, 0, 1] = 5.0
    expected[1, 0, 0, 0, 1] = -2.0
    torch.testing.assert_close(A_in, expected)
    torch.testing.assert_close(bias, torch.tensor([[0.0], [-3.0 * 1.1]]))


def _pool_net(pool: nn.Module, in_shape: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [Normalize([0.4], [0.3]), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), pool, nn.ReLU()]
    with torch.no_grad():
        features = nn.Sequential(*layers)(torch.zeros(1, *in_shape)).numel()
    layers += [nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(features, 3)]
    return nn.Sequential(*layers).eval()


POOLS = [
    nn.AvgPool2d(3, stride=1, padding=1),
    nn.AvgPool2d((2, 3), stride=(1, 2)),
    nn.AvgPool2d(2, stride=2, padding=1),
    nn.MaxPool2d(3, stride=2),
    nn.MaxPool2d((2, 3), stride=1, dilation=(1, 2)),
]


@pytest.mark.parametrize("pool", POOLS, ids=repr)
def test_pool_geometries_are_sound_and_patches_equal_dense(pool):
    model = _pool_net(pool, (1, 6, 7))
    x = torch.rand(3, 1, 6, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    box = input_box(x, torch.tensor([0.01, 0.04, 0.1]))
    with torch.no_grad():
        dense = crown_margins(model, box, y, use_patches=False)
        windowed = crown_margins(model, box, y, use_patches=True)
    torch.testing.assert_close(windowed, dense, atol=1e-5, rtol=1e-5)
    for method in bounds.METHODS:
        lb = margin_bounds(model, x[:2], y[:2], torch.tensor([0.01, 0.025]), method)
        for i, eps in enumerate((0.01, 0.025)):
            exact = torch.from_numpy(exact_min_margins(model, x[i], int(y[i]), eps))
            assert (lb[i].double() <= exact + 1e-6).all(), (method, lb[i], exact)
