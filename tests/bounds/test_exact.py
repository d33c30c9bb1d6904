"""Tests of the exact MILP verifier in tests/kit/exact.py (ground truth for the bound and radius
tests)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from acert.bounds import margin_bounds
from acert.models import Normalize, Residual
from tests.kit.exact import (
    count_binaries,
    exact_certified,
    exact_min_margins,
    exact_radius,
    exact_worst_input,
    forward_float64,
    network_float64,
)


def _margins_torch(model: nn.Module, xs: torch.Tensor, y: int) -> np.ndarray:
    """``f_y - f_t`` (t != y, increasing) of a float64 copy of ``model`` on the batch ``xs``."""
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(xs.double()).numpy()
    others = [t for t in range(logits.shape[1]) if t != y]
    return logits[:, [y]] - logits[:, others]


def _box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xd = x.double()
    return (xd - eps).clamp(min=0.0), (xd + eps).clamp(max=1.0)


def _mlp2(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize([0.4, 0.6], [0.2, 0.3]), nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    return model.eval()


def _conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize([0.1], [0.3]),
        nn.Conv2d(1, 2, 3, stride=2, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )
    bn = model[2]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0]))
        bn.weight.copy_(torch.tensor([1.5, -0.7]))
        bn.bias.copy_(torch.tensor([0.1, 0.2]))
    return model.eval()


def _predicted(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[None]).argmax())


# ------------------------------------------------------------------------------------------------
# 2-D network: compare with a dense grid search
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_input_network_matches_grid_search(seed: int) -> None:
    model = _mlp2(seed)
    x, eps = torch.tensor([0.45, 0.55]), 0.2
    y = _predicted(model, x)
    assert count_binaries(model, x, eps) > 0  # the MILP needs binaries

    exact = exact_min_margins(model, x, y, eps)
    assert exact.shape == (2,) and exact.dtype == np.float64

    lo, hi = _box(x, eps)
    g0, g1 = torch.meshgrid(
        torch.linspace(float(lo[0]), float(hi[0]), 401, dtype=torch.float64),
        torch.linspace(float(lo[1]), float(hi[1]), 401, dtype=torch.float64),
        indexing="ij",
    )
    grid = _margins_torch(model, torch.stack([g0.ravel(), g1.ravel()], dim=1), y)
    grid_min, spread = grid.min(axis=0), grid.max(axis=0) - grid.min(axis=0)
    assert np.all(spread > 1e-3)
    assert np.all(grid_min >= exact - 1e-6)  # nothing in the box beats the exact minimum
    assert np.all(grid_min - exact <= 1e-2 * spread)  # and the grid gets close to it

    # the sound IBP bound of acert is below the exact minimum
    ibp = margin_bounds(model, x[None], torch.tensor([y]), eps, "ibp")[0]
    assert (ibp.detach().double().numpy() <= exact + 1e-9).all()
    for i, t in enumerate(t for t in range(3) if t != y):
        worst = exact_worst_input(model, x, y, eps, t)
        assert worst.shape == x.shape
        assert torch.all(worst >= 0) and torch.all(worst <= 1)
        assert torch.all((worst - x.double()).abs() <= eps + 1e-12)
        with torch.no_grad():
            logits = model(worst.float()[None])[0]
        assert float(logits[y] - logits[t]) == pytest.approx(exact[i], abs=1e-5)
        assert _margins_torch(model, worst[None], y)[0, i] == pytest.approx(exact[i], abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Clipping to the domain [0, 1]
# ------------------------------------------------------------------------------------------------


def _corner_net() -> nn.Sequential:
    """``f_0 - f_1 = x_0 - x_1 + 1.2`` and ``f_0 - f_2 = x_0 - x_1 + 11.2`` through ReLUs."""
    model = nn.Sequential(
        Normalize([0.5, 0.5], [0.5, 0.5]), nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)
    )
    with torch.no_grad():
        # Normalize gives 2x - 1; the first layer undoes it: rows x0, -x0, x1, -x1
        model[1].weight.copy_(
            0.5 * torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        )
        model[1].bias.copy_(torch.tensor([0.5, -0.5, 0.5, -0.5]))
        model[3].weight.copy_(torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0] * 4, [0.0] * 4]))
        model[3].bias.copy_(torch.tensor([1.2, 0.0, -10.0]))
    return model.eval()


def test_clipping_to_unit_box_matters() -> None:
    model = _corner_net()
    x, eps = torch.tensor([0.05, 0.97]), 0.3
    # inside [0, 1]^2 the minimum is at the corner (0, 1); the unclipped ball reaches (-0.25, 1.27)
    exact = exact_min_margins(model, x, 0, eps)
    np.testing.assert_allclose(exact, [0.2, 10.2], atol=1e-7)
    unclipped = _margins_torch(model, torch.tensor([[-0.25, 1.27]]), 0)[0]
    np.testing.assert_allclose(unclipped, [-0.32, 9.68], atol=1e-6)
    assert np.all(unclipped < exact - 0.5)

    assert exact_certified(model, x, 0, eps)  # would fail without the clipping
    worst = exact_worst_input(model, x, 0, eps, 1)
    np.testing.assert_allclose(worst.numpy(), [0.0, 1.0], atol=1e-7)

    # a random network near the corner: the exact value matches a grid over the clipped box only
    model = _mlp2(3)
    y = _predicted(model, x)
    exact = exact_min_margins(model, x, y, eps)
    lo, hi = _box(x, eps)
    g = torch.rand(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    clipped = _margins_torch(model, lo + g * (hi - lo), y)
    assert np.all(clipped.min(axis=0) >= exact - 1e-6)


# ------------------------------------------------------------------------------------------------
# Convolutional network with batch norm
# ------------------------------------------------------------------------------------------------


def test_conv_net_worst_input_and_sampling() -> None:
    model = _conv_net()
    x = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(1))
    y, eps = _predicted(model, x), 0.06
    assert count_binaries(model, x, eps) > 0

    exact = exact_min_margins(model, x, y, eps)
    assert exact.shape == (2,)
    lo, hi = _box(x, eps)
    for i, t in enumerate(t for t in range(3) if t != y):
        worst = exact_worst_input(model, x, y, eps, t)
        assert worst.shape == x.shape
        assert torch.all(worst >= lo - 1e-12) and torch.all(worst <= hi + 1e-12)
        with torch.no_grad():
            logits = model(worst.float()[None])[0]
        assert float(logits[y] - logits[t]) == pytest.approx(exact[i], abs=1e-5)
        assert _margins_torch(model, worst[None], y)[0, i] == pytest.approx(exact[i], abs=1e-9)

    gen = torch.Generator().manual_seed(2)
    n = 20000
    uniform = lo + torch.rand(n, *x.shape, dtype=torch.float64, generator=gen) * (hi - lo)
    corners = torch.where(torch.rand(n, *x.shape, generator=gen) < 0.5, lo, hi)
    samples = _margins_torch(model, torch.cat([uniform, corners]), y)
    assert np.all(samples.min(axis=0) >= exact - 1e-6)


@pytest.mark.parametrize(
    ("c_in", "stride", "padding", "bias", "mode"),
    [
        (1, 2, 1, True, "zeros"),
        (1, 1, 0, False, "zeros"),
        (2, 2, 2, True, "zeros"),
        (2, 1, 1, True, "circular"),
    ],
)
def test_affine_conversion_matches_torch(c_in, stride, padding, bias, mode) -> None:
    torch.manual_seed(c_in + stride + padding)
    model = nn.Sequential(
        Normalize([0.2, 0.4][:c_in], [0.3, 0.2][:c_in]),
        nn.Conv2d(c_in, 3, 3, stride=stride, padding=padding, bias=bias, padding_mode=mode),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Identity()),
    )
    with torch.no_grad():
        probe = model[:3](torch.zeros(1, c_in, 6, 6))
    model.append(nn.Linear(probe.numel(), 5, bias=bias))
    model.append(nn.BatchNorm1d(5))
    model.append(nn.ReLU())
    model.append(nn.Linear(5, 4))
    for bn in (model[2], model[7]):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    model.eval()
    ops = network_float64(model, (c_in, 6, 6))
    # consecutive affine modules are composed into one map
    assert [op.kind for op in ops] == ["affine", "relu", "relu", "affine", "relu", "affine"]
    xs = torch.rand(16, c_in, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(xs).numpy()
    np.testing.assert_allclose(
        forward_float64(ops, xs.reshape(16, -1).numpy()), expected, atol=1e-12
    )


# ------------------------------------------------------------------------------------------------
# Max pooling, average pooling and residual blocks
# ------------------------------------------------------------------------------------------------


def _pool_residual_net(seed: int = 0) -> nn.Sequential:
    """(1, 5, 5) -> conv -> ReLU -> residual block (conv, BN, ReLU, conv 1x1, with a nested
    block) -> max pool 2/1 -> avg pool 2 -> linear(3)."""
    torch.manual_seed(seed)
    inner = Residual(nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()))
    body = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), inner, nn.Conv2d(2, 2, 1)
    )
    model = nn.Sequential(
        Normalize([0.3], [0.4]),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        Residual(body),
        nn.MaxPool2d(2, stride=1),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        body[1].running_mean.copy_(torch.tensor([0.2, -0.3]))
        body[1].running_var.copy_(torch.tensor([0.6, 1.7]))
    return model.eval()


def test_pool_residual_conversion_matches_torch() -> None:
    model = _pool_residual_net()
    ops = network_float64(model, (1, 5, 5))
    assert [op.kind for op in ops].count("maxpool") == 1
    assert [op.kind for op in ops].count("add") == 2
    xs = torch.rand(32, 1, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(xs).numpy()
    np.testing.assert_allclose(
        forward_float64(ops, xs.reshape(32, -1).numpy()), expected, atol=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_pool_residual_net_worst_input_and_sampling(seed: int) -> None:
    model = _pool_residual_net(seed)
    x = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(seed + 3))
    y, eps = _predicted(model, x), 0.03
    assert count_binaries(model, x, eps) > 0
    exact = exact_min_margins(model, x, y, eps)
    lo, hi = _box(x, eps)
    for i, t in enumerate(t for t in range(3) if t != y):
        worst = exact_worst_input(model, x, y, eps, t)
        assert torch.all(worst >= lo - 1e-12) and torch.all(worst <= hi + 1e-12)
        assert _margins_torch(model, worst[None], y)[0, i] == pytest.approx(exact[i], abs=1e-9)
    gen = torch.Generator().manual_seed(seed)
    n = 20000
    uniform = lo + torch.rand(n, *x.shape, dtype=torch.float64, generator=gen) * (hi - lo)
    corners = torch.where(torch.rand(n, *x.shape, generator=gen) < 0.5, lo, hi)
    samples = _margins_torch(model, torch.cat([uniform, corners]), y)
    assert np.all(samples.min(axis=0) >= exact - 1e-6)


@pytest.mark.parametrize("weight", [2.0, -3.0])
def test_max_pooling_minimum_by_hand(weight: float) -> None:
    """``f_0 - f_1 = w·max(x)`` over a box: ``w·max(lo)`` for w > 0 (every input at its lower
    end), ``w·max(hi)`` for w < 0, where the maximum itself must be maximised (binaries)."""
    model = nn.Sequential(
        Normalize([0.0], [1.0]), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1, 2, bias=False)
    )
    with torch.no_grad():
        model[3].weight.copy_(torch.tensor([[weight], [0.0]]))
    x, eps = torch.tensor([[[0.2, 0.5], [0.45, 0.1]]]), 0.1
    lo, hi = _box(x, eps)
    expected = weight * float(lo.max() if weight > 0 else hi.max())
    np.testing.assert_allclose(exact_min_margins(model.eval(), x, 0, eps), [expected], atol=1e-9)
    assert count_binaries(model, x, eps) == 2  # the inputs at 0.5 and 0.45 may be the maximum


# ------------------------------------------------------------------------------------------------
# eps = 0 and the radius search
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_eps_zero_gives_clean_margins(net: str) -> None:
    if net == "mlp":
        model, x = _mlp2(0), torch.tensor([0.3, 0.8])
    else:
        model, x = _conv_net(), torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(4))
    for y in range(3):
        exact = exact_min_margins(model, x, y, 0.0)
        np.testing.assert_allclose(exact, _margins_torch(model, x[None], y)[0], atol=1e-9)


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_exact_radius(net: str) -> None:
    if net == "mlp":
        model, x = _mlp2(0), torch.tensor([0.45, 0.55])
    else:
        model, x = _conv_net(), torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(1))
    y, tol, eps_max = _predicted(model, x), 1e-6, 0.5
    r = exact_radius(model, x, y, eps_max, tol=tol)
    assert 0 < r < eps_max
    assert exact_certified(model, x, y, r)
    assert np.all(exact_min_margins(model, x, y, r) > 0)
    assert not exact_certified(model, x, y, r + 2 * tol)
    assert exact_min_margins(model, x, y, r + 2 * tol).min() <= 0

    # certified at eps_max: the radius is eps_max itself
    small = r / 2
    assert exact_radius(model, x, y, small, tol=tol) == small
    # misclassified at x: radius 0
    wrong = (y + 1) % 3
    assert not exact_certified(model, x, wrong, 0.0)
    assert exact_radius(model, x, wrong, eps_max, tol=tol) == 0.0


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_errors() -> None:
    model, x = _mlp2(0), torch.tensor([0.45, 0.55])
    with pytest.raises(ValueError, match="t=0 must be a class other than y=0"):
        exact_worst_input(model, x, 0, 0.1, 0)
    with pytest.raises(ValueError, match="empty"):
        exact_min_margins(model, torch.tensor([1.5, 0.5]), 0, 0.1)
    with pytest.raises(ValueError, match="label"):
        exact_min_margins(model, x, 3, 0.1)
    with pytest.raises(TypeError, match="Tanh"):
        exact_min_margins(nn.Sequential(*model[:2], nn.Tanh(), model[3]), x, 0, 0.1)
    train_bn = nn.Sequential(Normalize([0.5], [0.5]), nn.Linear(2, 4), nn.BatchNorm1d(4), nn.ReLU())
    train_bn.append(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="eval mode"):
        exact_min_margins(train_bn, x, 0, 0.1)
