"""CROWN and CROWN-IBP: hand-computed values, exactness on linear nets, comparison with the exact
MILP minimum (tests/kit/exact.py), conv transposes with output padding, chunking, train-mode
stats."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import acert.bounds as bounds
from acert.bounds import clean_forward, input_box, margin_bounds
from acert.bounds.crown import crown_margins, relu_relaxation
from acert.bounds.interval import Interval
from acert.models import Normalize
from tests.kit.exact import exact_min_margins

from .test_ibp import HAND_EPS, HAND_IBP, HAND_X, HAND_Y, hand_net

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = tuple(bounds.METHODS)

# The hand net of test_ibp (h1 in [-0.1, 1.1] unstable, h2 in [0.8, 2] active), CROWN by hand:
# y=0, t=2: a1 + 0.3 with a positive coefficient on a1 -> lower line a1 >= h1 (slope 1 since
#   u = 1.1 >= -l = 0.1) -> min h1 + 0.3 = -0.1 + 0.3 = 0.2: LOOSER than IBP's 0.3.
# y=1, t=2: a1 - a2 + 0.5 -> h1 - h2 + 0.5 = 2 z1 + 1 >= 2(-1) + 1 = -1.0 (IBP -1.5).
# y=2, t=1: -a1 + a2 - 0.5 with upper chord a1 <= 1.1/1.2 (h1 + 0.1):
#   -(11/12)(z1 + z2 + 0.6) + (-z1 + z2) - 0.5 = -(23/12) z1 + (1/12) z2 - 1.05
#   >= (23/12)(0.4) + (1/12)(0.4) - 1.05 = 0.8 - 1.05 = -0.25 (IBP -0.8; exact -0.2).
HAND_CROWN = torch.tensor([[0.6, 0.2], [-1.8, -1.0], [-1.4, -0.25]])
HAND_EXACT = np.array([[0.6, 0.3], [-1.8, -1.0], [-1.4, -0.2]])


@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
def test_crown_matches_hand_computation(method, exact_arithmetic):
    model = hand_net()
    lb = margin_bounds(model, HAND_X, HAND_Y, HAND_EPS, method)
    torch.testing.assert_close(lb, HAND_CROWN, atol=1e-6, rtol=0)
    # a case where CROWN is strictly looser than IBP (the slope-1 lower line of an unstable ReLU)
    assert lb[0, 1] < HAND_IBP[0, 1] - 0.05
    for i in range(3):
        exact = exact_min_margins(model, HAND_X[i], int(HAND_Y[i]), HAND_EPS)
        np.testing.assert_allclose(exact, HAND_EXACT[i], atol=1e-6)
        assert np.all(lb[i].detach().numpy() <= exact + 1e-6)


def test_relu_relaxation_rules():
    lower = torch.tensor([-2.0, -1.0, -1.0, 0.0, 0.5, -3.0, -1.0])
    upper = torch.tensor([-0.5, 3.0, 0.5, 2.0, 1.0, 0.0, 1.0])
    r = relu_relaxation(Interval.from_bounds(lower, upper))
    # inactive, unstable (u >= -l: slope 1), unstable (u < -l: slope 0), active at l = 0,
    # active, inactive with u = 0, unstable with u = -l (slope 1)
    torch.testing.assert_close(r.lower_slope, torch.tensor([0.0, 1, 0, 1, 1, 0, 1]))
    torch.testing.assert_close(r.upper_slope, torch.tensor([0.0, 0.75, 1 / 3, 1, 1, 0, 0.5]))
    torch.testing.assert_close(r.upper_intercept, torch.tensor([0.0, 0.75, 1 / 3, 0, 0, 0, 0.5]))
    # the lines bound relu on [l, u]
    t = torch.linspace(0, 1, 101)[:, None]
    z = lower + t * (upper - lower)
    relu = z.clamp(min=0)
    assert (r.lower_slope * z <= relu + 1e-6).all()
    assert (r.upper_slope * z + r.upper_intercept >= relu - 1e-6).all()


CONV_CASES = [
    # (in_shape, Conv2d kwargs): odd and even sizes, stride 2, padding 0/1, no bias, dilation,
    # groups; the transpose of most of them needs output_padding 1 in some dimension
    ((2, 8, 8), dict(out_channels=3, kernel_size=3, stride=2, padding=0, bias=False)),
    ((2, 7, 7), dict(out_channels=3, kernel_size=3, stride=2, padding=0)),
    ((2, 6, 6), dict(out_channels=3, kernel_size=3, stride=2, padding=1)),
    ((1, 8, 7), dict(out_channels=2, kernel_size=2, stride=2, padding=1, bias=False)),
    ((3, 5, 6), dict(out_channels=2, kernel_size=(3, 2), stride=(2, 1), padding=(0, 1))),
    ((2, 10, 10), dict(out_channels=4, kernel_size=3, stride=3, padding=1, dilation=2)),
    ((4, 6, 6), dict(out_channels=2, kernel_size=3, stride=2, padding=1, groups=2)),
]


def _output_padding(in_shape, conv):
    """What conv_transpose2d needs to map the conv's output size back to its input size."""
    layer = nn.Conv2d(in_shape[0], **conv)
    out = layer(torch.zeros(1, *in_shape)).shape[2:]
    return [
        n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for n, o, s, p, d, k in zip(
            in_shape[1:],
            out,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.kernel_size,
            strict=True,
        )
    ]


def test_conv_cases_need_output_padding():
    needs = [max(_output_padding(shape, conv)) > 0 for shape, conv in CONV_CASES]
    assert sum(needs) >= 4 and not all(needs)


@pytest.mark.parametrize("in_shape, conv", CONV_CASES)
def test_crown_is_exact_on_linear_conv_nets(in_shape, conv, exact_arithmetic):
    """Without ReLUs the margin is linear in x; CROWN's backward pass (conv transposes with
    output padding) must then give exactly its minimum over the box, which is computed here
    from the gradient: min (g·x + c) = g·centre + c - |g|·radius."""
    torch.manual_seed(0)
    c = in_shape[0]
    layer = nn.Conv2d(c, **conv)
    with torch.no_grad():
        n_out = layer(torch.zeros(1, *in_shape)).numel()
    bn = nn.BatchNorm2d(conv["out_channels"])
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
    model = nn.Sequential(
        Normalize([0.5] * c, [0.3] * c), layer, bn, nn.Flatten(), nn.Linear(n_out, 4)
    ).eval()
    x = torch.rand(3, *in_shape)
    y = torch.tensor([0, 2, 3])
    eps = torch.tensor([0.05, 0.2, 0.7])
    box = input_box(x, eps)
    x_req = x.clone().requires_grad_(True)
    logits = model(x_req)
    expected = []
    for t in range(4):
        # gradient of z_y - z_t w.r.t. x for every row at once (rows are independent)
        diff = logits.gather(1, y[:, None]) - logits[:, t : t + 1]
        (g,) = torch.autograd.grad(diff.sum(), x_req, retain_graph=True)
        value = model(box.centre).gather(1, y[:, None])[:, 0] - model(box.centre)[:, t]
        expected.append(value - (g.abs() * box.radius).flatten(1).sum(1))
    expected = torch.stack(expected, 1).detach()
    others = torch.tensor([[1, 2, 3], [0, 1, 3], [0, 1, 2]])
    expected = expected.gather(1, others)
    for method in ("crown-ibp", "crown"):  # CROWN is exact where IBP is not
        lb = margin_bounds(model, x, y, eps, method)
        torch.testing.assert_close(lb, expected, atol=1e-5, rtol=1e-5)
    # IBP is looser here: the two affine maps (conv and last linear) do not commute with |.|
    assert (margin_bounds(model, x, y, eps, "ibp") <= expected + 1e-5).all()


def _exact_rows(model, x, y, eps):
    return np.stack(
        [exact_min_margins(model, x[i], int(y[i]), float(eps[i])) for i in range(len(y))]
    )


EXACT_EPS = torch.tensor([0.02, 0.06, 0.12])


@pytest.mark.parametrize("name", ["mlp", "mlp-bn", "cnn", "cnn-bn"])
def test_bounds_below_exact_minimum(tiny_net, name):
    model, shape = tiny_net(name, seed=5)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmax(1)
    exact = _exact_rows(model, x, y, EXACT_EPS)
    lbs = {m: margin_bounds(model, x, y, EXACT_EPS, m).detach().numpy() for m in METHODS}
    for method, lb in lbs.items():
        assert np.all(lb <= exact + 1e-5), (method, (lb - exact).max())
    # tightness over IBP holds on average only (the hand example is a per-sample counter case);
    # CROWN vs CROWN-IBP is not ordered even on average over 3 samples (cnn-bn: CROWN is looser,
    # from adaptive lower slopes that flip with the tighter intermediate bounds)
    assert lbs["crown"].mean() >= lbs["ibp"].mean()
    assert lbs["crown-ibp"].mean() >= lbs["ibp"].mean()


def test_train_mode_bounds_below_exact_minimum_of_the_frozen_net(tiny_net):
    """Train-mode bounds with clean-batch stats bound the net whose batch-norms are frozen at
    those stats (eval mode with running stats = the batch's mean and biased variance)."""
    model, shape = tiny_net("cnn-bn", seed=6)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(6))
    model.train()
    logits, stats = clean_forward(model, x, update_running_stats=False)
    y = logits.argmax(1)
    frozen = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer, ref in zip(model, frozen, strict=True):
            if layer in stats:
                ref.running_mean.copy_(stats[layer][0])
                ref.running_var.copy_(stats[layer][1])
    torch.testing.assert_close(frozen(x), logits)
    exact = _exact_rows(frozen, x, y, EXACT_EPS)
    for method in METHODS:
        lb = margin_bounds(model, x, y, EXACT_EPS, method, stats=stats).detach().numpy()
        assert np.all(lb <= exact + 1e-5), method
        lb_frozen = margin_bounds(frozen, x, y, EXACT_EPS, method).detach().numpy()
        np.testing.assert_allclose(lb, lb_frozen, atol=1e-5)


def test_crown_ibp_tighter_than_ibp_on_average_at_initialisation():
    """At an IBP-style initialisation CROWN-IBP and CROWN beat IBP on average over samples."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5] * 10, [0.3] * 10),
        nn.Linear(10, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 5),
    ).eval()
    x = torch.rand(64, 10)
    y = torch.randint(0, 5, (64,))
    lb = {m: margin_bounds(model, x, y, 0.03, m) for m in METHODS}
    assert lb["crown-ibp"].mean() > lb["ibp"].mean()
    assert lb["crown"].mean() >= lb["crown-ibp"].mean()
    # CROWN's intermediate bounds are intersected with IBP's: never looser per neuron, so
    # CROWN's last-layer bounds can only differ from CROWN-IBP's through the slopes chosen


def _recorded_preactivations(monkeypatch, model, x, y, eps, method, stats=None):
    """The pre-activation intervals the backward pass relaxes, in ReLU order."""
    seen = []

    def recording(pre):
        seen.append(pre)
        return relu_relaxation(pre)

    monkeypatch.setattr("acert.bounds.activations.relu_relaxation", recording)
    lb = margin_bounds(model, x, y, eps, method, stats=stats)
    monkeypatch.undo()
    return lb, seen


@pytest.mark.parametrize("name, mode", [("mlp-bn", "eval"), ("cnn", "eval"), ("cnn-bn", "train")])
def test_crown_intermediate_bounds_are_sound_and_within_ibp(tiny_net, monkeypatch, name, mode):
    model, shape = tiny_net(name, seed=5)
    model.train(mode == "train")
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, *shape, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    eps = torch.tensor([0.02, 0.06, 0.12, 0.3])
    stats = clean_forward(model, x, update_running_stats=False)[1]
    _, ibp_pre = _recorded_preactivations(monkeypatch, model, x, y, eps, "crown-ibp", stats)
    _, crown_pre = _recorded_preactivations(monkeypatch, model, x, y, eps, "crown", stats)
    relus = [i for i, layer in enumerate(model) if isinstance(layer, nn.ReLU)]
    assert len(ibp_pre) == len(crown_pre) == len(relus)
    # the pre-activations of sampled points of the ball (corners included)
    box = input_box(x, eps)
    u = torch.rand(4, 300, *shape, generator=g)
    u[:, 200:] = u[:, 200:].round()
    points = (box.lower.unsqueeze(1) + u * (box.radius * 2).unsqueeze(1)).flatten(0, 1)
    tighter = 0
    for relu, ibp_box, crown_box in zip(relus, ibp_pre, crown_pre, strict=True):
        h = points
        with torch.no_grad():
            for layer in list(model)[:relu]:
                if layer in stats:
                    mean, var = stats[layer]
                    view = (1, -1) + (1,) * (h.dim() - 2)
                    h = (h - mean.view(view)) / (var.view(view) + layer.eps).sqrt()
                    h = h * layer.weight.view(view) + layer.bias.view(view)
                else:
                    h = layer(h)
        h = h.view(4, 300, *h.shape[1:])
        for pre in (ibp_box, crown_box):
            assert (h >= pre.lower.unsqueeze(1) - 1e-5).all()
            assert (h <= pre.upper.unsqueeze(1) + 1e-5).all()
        slack = 1e-6 * (1 + ibp_box.lower.abs().maximum(ibp_box.upper.abs()))
        assert (crown_box.lower >= ibp_box.lower - slack).all()
        assert (crown_box.upper <= ibp_box.upper + slack).all(), (
            crown_box.upper - ibp_box.upper
        ).max()
        tighter += int((crown_box.lower > ibp_box.lower + 1e-4).sum())
    assert tighter > 0  # CROWN does tighten some intermediate bound


@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
def test_crown_monotone_in_eps_on_average(tiny_net, method):
    model, shape = tiny_net("mlp-bn", seed=2)
    x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 4
    grid = torch.linspace(0, 0.3, 13)
    lbs = torch.stack([margin_bounds(model, x, y, float(e), method) for e in grid])
    means = lbs.flatten(1).mean(1)
    assert (means[1:] <= means[:-1] + 1e-6).all()


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
@pytest.mark.parametrize("name, mode", [("mlp-bn", "eval"), ("cnn-bn", "train"), ("cnn", "eval")])
def test_chunking_does_not_change_the_bounds(tiny_net, name, mode, intermediate):
    model, shape = tiny_net(name, seed=8)
    model.train(mode == "train")
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([0, 1, 2, 1, 0])
    stats = clean_forward(model, x, update_running_stats=False)[1]
    box = input_box(x, torch.tensor([0.0, 0.03, 0.1, 0.2, 0.5]))
    big = crown_margins(model, box, y, stats, intermediate)
    for budget in (1, 37, 500):
        small = crown_margins(model, box, y, stats, intermediate, memory_budget=budget)
        torch.testing.assert_close(small, big, atol=1e-6, rtol=1e-6)


def test_crown_with_a_single_value_normalize():
    """Normalize with one mean/std broadcast over all features: the forward pass and IBP accept
    it, so CROWN must too (its backward rule used to multiply the (Q, S, D) coefficients by the
    (1,) shift with a matmul and failed with 'size mismatch')."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5], [0.25]), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)
    ).eval()
    wide = nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), *copy.deepcopy(list(model)[1:])).eval()
    x = torch.rand(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(model(x), wide(x))
    for method in METHODS:
        torch.testing.assert_close(
            margin_bounds(model, x, y, 0.1, method), margin_bounds(wide, x, y, 0.1, method)
        )
    # the same for images: one value for three channels
    conv = nn.Sequential(
        Normalize([0.5], [0.25]), nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
    ).eval()
    img = torch.rand(2, 3, 4, 4)
    lb = margin_bounds(conv, img, torch.tensor([0, 1]), 0.05, "crown")
    assert torch.isfinite(lb).all()


def test_crown_in_float64(tiny_net):
    model, shape = tiny_net("cnn-bn", seed=9)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(9))
    y = torch.tensor([0, 1, 2])
    for method in METHODS:
        lb32 = margin_bounds(model, x, y, 0.05, method)
        lb64 = margin_bounds(copy.deepcopy(model).double(), x.double(), y, 0.05, method)
        assert lb64.dtype == torch.float64
        torch.testing.assert_close(lb64.float(), lb32, atol=1e-4, rtol=1e-4)
