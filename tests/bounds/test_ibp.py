"""IBP against a hand-computed answer, and soundness of every bound method by sampling.

Soundness: a lower bound of ``f_y - f_t`` over the clipped ball must not exceed the margin at
any point of the ball: random points, corners, and the points PGD finds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import acert.bounds as bounds
from acert.bounds import (
    Interval,
    clean_forward,
    ibp,
    input_box,
    margin_bounds,
    margin_bounds_on_box,
    margin_evaluator,
)
from acert.bounds.spec import folded_margin_layer, other_classes
from acert.models import Normalize
from acert.radius.attacks import pgd_attack

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = tuple(bounds.METHODS)
TOL = 1e-5


def hand_net() -> nn.Sequential:
    """Normalize(.5, .5) -> Linear(2, 2) -> ReLU -> Linear(2, 3) with fixed weights."""
    model = nn.Sequential(
        Normalize([0.5, 0.5], [0.5, 0.5]), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3)
    )
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))
        model[1].bias.copy_(torch.tensor([0.5, 0.0]))
        model[3].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
        model[3].bias.copy_(torch.tensor([0.0, 0.2, -0.3]))
    return model.eval()


# x = (0.1, 0.9), eps = 0.2. Clipped box: x1 in [max(-0.1, 0), 0.3] = [0, 0.3] (clipped at 0),
# x2 in [0.7, min(1.1, 1)] = [0.7, 1] (clipped at 1).
# Normalize z = 2x - 1: z1 in [-1, -0.4], z2 in [0.4, 1].
# h1 = z1 + z2 + 0.5 in [-1 + 0.4 + 0.5, -0.4 + 1 + 0.5] = [-0.1, 1.1] -> a1 = relu in [0, 1.1]
# h2 = -z1 + z2      in [0.4 + 0.4, 1 + 1]           = [0.8, 2]    -> a2 = relu in [0.8, 2]
# Logits f0 = a1 + a2, f1 = a1 + 0.2, f2 = a2 - 0.3. Folded rows W_y - W_t, b_y - b_t:
# y=0: f0-f1 = a2 - 0.2        -> 0.8 - 0.2 = 0.6;   f0-f2 = a1 + 0.3       -> 0 + 0.3 = 0.3
# y=1: f1-f0 = -a2 + 0.2       -> -2 + 0.2 = -1.8;   f1-f2 = a1 - a2 + 0.5  -> 0 - 2 + 0.5 = -1.5
# y=2: f2-f0 = -a1 - 0.3       -> -1.1 - 0.3 = -1.4; f2-f1 = -a1 + a2 - 0.5 -> -1.1+0.8-0.5 = -0.8
HAND_X = torch.tensor([[0.1, 0.9]] * 3)
HAND_Y = torch.tensor([0, 1, 2])
HAND_EPS = 0.2
HAND_IBP = torch.tensor([[0.6, 0.3], [-1.8, -1.5], [-1.4, -0.8]])
# Without the clipping z1 in [-1.2, -0.4], z2 in [0.4, 1.2]: a1 in [0, 1.3], a2 in [0.8, 2.4], and
# y=1 would give [-2.2, -1.9], y=2 [-1.6, -1.0]: the clipped answer above is strictly tighter.
UNCLIPPED_IBP = torch.tensor([[0.6, 0.3], [-2.2, -1.9], [-1.6, -1.0]])
# Bounding the logits first and subtracting: f0 in [0.8, 3.1], f1 in [0.2, 1.3], f2 in [0.5, 1.7],
# so for y=0: f0-f1 >= 0.8 - 1.3 = -0.5 and f0-f2 >= 0.8 - 1.7 = -0.9 (much looser than 0.6, 0.3).
UNFOLDED_Y0 = torch.tensor([-0.5, -0.9])


def test_ibp_matches_hand_computation(exact_arithmetic):
    lb = margin_bounds(hand_net(), HAND_X, HAND_Y, HAND_EPS, "ibp")
    assert lb.shape == (3, 2)
    torch.testing.assert_close(lb, HAND_IBP, atol=1e-6, rtol=0)
    # the domain clipping matters for y = 1, 2 and is applied
    assert (lb[1:] > UNCLIPPED_IBP[1:] + 0.1).all()


def test_folded_specification_is_strictly_tighter_than_logit_intervals(exact_arithmetic):
    model = hand_net()
    lb = margin_bounds(model, HAND_X[:1], HAND_Y[:1], HAND_EPS, "ibp")[0]
    # the logit intervals, computed by the code's own IBP on a network whose last layer is
    # the identity on the logits (K = 3 "margins" f_0 - 0 against a zero logit are not
    # available, so bound each logit through a last layer extended by a zero row)
    extended = copy.deepcopy(model)
    last = nn.Linear(2, 4)
    with torch.no_grad():
        last.weight.copy_(torch.cat([model[3].weight, torch.zeros(1, 2)]))
        last.bias.copy_(torch.cat([model[3].bias, torch.zeros(1)]))
    extended[3] = last
    # label 3 (the zero logit): -f_t >= -upper(f_t); label t vs 3: f_t >= lower(f_t)
    x = HAND_X[:1].expand(4, 2)
    lb_ext = margin_bounds(extended, x, torch.tensor([3, 0, 1, 2]), HAND_EPS, "ibp")
    upper = -lb_ext[0]  # upper bounds of f0, f1, f2
    lower = torch.stack([lb_ext[1, 2], lb_ext[2, 2], lb_ext[3, 2]])  # f_t - 0, t = 0, 1, 2
    torch.testing.assert_close(lower, torch.tensor([0.8, 0.2, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(upper, torch.tensor([3.1, 1.3, 1.7]), atol=1e-6, rtol=0)
    unfolded = lower[0] - upper[1:]
    torch.testing.assert_close(unfolded, UNFOLDED_Y0, atol=1e-6, rtol=0)
    assert (lb > unfolded + 0.5).all()


def _ball_points(x, eps, n_random, n_corners, generator):
    """(B, n, ...) random points and random corners of the clipped ball around each row."""
    e = eps.view(-1, *([1] * (x.dim() - 1)))
    lo, hi = (x - e).clamp(0, 1), (x + e).clamp(0, 1)
    shape = (x.shape[0], n_random + n_corners, *x.shape[1:])
    u = torch.rand(shape, generator=generator)
    u[:, n_random:] = u[:, n_random:].round()
    return lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)


def _inputs(shape, batch, generator):
    x = torch.rand(batch, *shape, generator=generator)
    flat = x.view(batch, -1)
    flat[:, 0], flat[:, -1] = 0.0, 1.0  # pixels on the domain's edges
    flat[0, 1] = 0.97
    return x


# per-row eps: 0, small, medium, large (clipping on most pixels), the whole domain
EPS_ROWS = torch.tensor([0.0, 0.01, 0.05, 0.15, 0.6, 1.5])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "name, mode",
    [
        ("mlp", "eval"),
        ("mlp-bn", "eval"),
        ("mlp-bn", "train"),
        ("cnn", "eval"),
        ("cnn-bn", "eval"),
        ("cnn-bn", "train"),
    ],
)
def test_bounds_are_below_margins_in_the_ball(tiny_net, margins_at, name, mode, method):
    model, shape = tiny_net(name, seed=3)
    g = torch.Generator().manual_seed(7)
    x = _inputs(shape, len(EPS_ROWS), g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[1] = (y[1] + 1) % 3  # one misclassified row
    stats = None
    reference = model
    if mode == "train":
        model.train()
        stats = clean_forward(model, x, update_running_stats=False)[1]
        # an eval-mode copy that normalises with the clean-batch statistics, for PGD
        reference = copy.deepcopy(model).eval()
        with torch.no_grad():
            for layer, ref in zip(model, reference, strict=True):
                if layer in stats:
                    ref.running_mean.copy_(stats[layer][0])
                    ref.running_var.copy_(stats[layer][1])
    lb = margin_bounds(model, x, y, EPS_ROWS, method, stats=stats)
    assert lb.shape == (x.shape[0], 2 if name != "mlp-bn" else 3)
    assert torch.isfinite(lb).all()

    points = _ball_points(x, EPS_ROWS, 200, 64, g)
    n = points.shape[1]
    sampled = margins_at(model, points.flatten(0, 1), y.repeat_interleave(n), stats)
    sampled = sampled.view(x.shape[0], n, -1).min(1).values
    assert (lb <= sampled + TOL).all(), (lb - sampled).max()

    adversarial = pgd_attack(reference, x, y, EPS_ROWS, steps=50, restarts=2, generator=g)
    assert ((adversarial - x).abs().flatten(1).max(1).values <= EPS_ROWS + 1e-6).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    attacked = margins_at(model, adversarial, y, stats)
    assert (lb <= attacked + TOL).all(), (lb - attacked).max()
    # with stats given explicitly the reference copy is the same function
    torch.testing.assert_close(
        margins_at(reference, adversarial, y), attacked, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "mlp-bn", "cnn", "cnn-bn"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_zero_eps_gives_the_clean_margins(
    tiny_net, margins_at, name, method, mode, exact_arithmetic
):
    model, shape = tiny_net(name, seed=1)
    x = _inputs(shape, 5, torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    model.train(mode == "train")
    stats = clean_forward(model, x, update_running_stats=False)[1]
    clean = margins_at(model, x, y, stats)
    for eps in (0.0, torch.zeros(5)):
        lb = margin_bounds(model, x, y, eps, method, stats=stats)
        torch.testing.assert_close(lb, clean, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["mlp", "mlp-bn", "cnn", "cnn-bn"])
def test_ibp_is_monotone_in_eps_per_sample(tiny_net, name):
    model, shape = tiny_net(name, seed=2)
    x = _inputs(shape, 8, torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3
    grid = torch.linspace(0, 0.4, 21)
    lbs = torch.stack([margin_bounds(model, x, y, float(e), "ibp") for e in grid])
    assert (lbs[1:] <= lbs[:-1] + 1e-6).all()
    assert (lbs[-1] < lbs[0] - 1e-3).all()  # the bounds do move
    # beyond eps = 1 the clipped ball is the whole domain: nothing changes any more
    torch.testing.assert_close(
        margin_bounds(model, x, y, 1.0, "ibp"), margin_bounds(model, x, y, 7.0, "ibp")
    )


def test_ibp_rows_are_independent_of_the_batch(tiny_net):
    """A row's bound depends only on its own input, eps and label (no batch coupling)."""
    model, shape = tiny_net("cnn-bn", seed=4)
    x = _inputs(shape, 6, torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    for method in METHODS:
        together = margin_bounds(model, x, y, EPS_ROWS, method)
        alone = torch.cat(
            [
                margin_bounds(model, x[i : i + 1], y[i : i + 1], EPS_ROWS[i], method)
                for i in range(6)
            ]
        )
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_bounds_have_gradients_for_training(tiny_net):
    model, shape = tiny_net("mlp-bn", seed=0)
    x = _inputs(shape, 4, torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    for method in METHODS:
        model.zero_grad()
        margin_bounds(model, x, y, 0.05, method).sum().backward()
        assert model[1].weight.grad is not None
        assert torch.isfinite(model[1].weight.grad).all()


@pytest.mark.parametrize("sound", [True, False])
def test_a_prepared_evaluator_gives_the_bounds_of_fresh_passes(tiny_net, sound):
    """A radius search prepares IBP's interval maps once and reuses them on every box: the
    bounds are exactly those of a pass prepared for that box alone, in train-mode batch-norm
    (the clean batch's statistics) as in eval mode."""
    for mode in ("eval", "train"):
        model, shape = tiny_net("cnn-bn", seed=5)
        model.train(mode == "train")
        x = _inputs(shape, 6, torch.Generator().manual_seed(4))
        y = torch.tensor([0, 1, 2, 2, 1, 0])
        with torch.no_grad():
            stats = clean_forward(model, x, update_running_stats=False)[1]
            evaluate = margin_evaluator(model, "ibp", stats, sound)
            for eps in (0.0, 0.03, EPS_ROWS, 0.3):
                box = input_box(x, eps)
                fresh = margin_bounds_on_box(model, box, y, "ibp", stats, sound)
                assert torch.equal(evaluate(box, y), fresh)
                rows = torch.tensor([4, 1])
                assert torch.equal(evaluate(box.index(rows), y[rows]), fresh[rows])


def test_a_prepared_program_carries_gradients_to_the_parameters(tiny_net):
    model, shape = tiny_net("cnn-bn", seed=6)
    model.train()
    x = _inputs(shape, 4, torch.Generator().manual_seed(5))
    stats = clean_forward(model, x)[1]
    program = ibp.prepare(model[:-1], stats, sound=False)
    hidden, preactivations = program(input_box(x, 0.05))
    assert len(preactivations) == sum(isinstance(m, nn.ReLU) for m in model)
    (hidden.centre + hidden.radius).sum().backward()
    conv = next(m for m in model if isinstance(m, nn.Conv2d))
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_the_gradient_through_the_folded_last_layer_is_the_same_every_time():
    """Training on several threads repeats itself from the seed: the per-sample rows W_y - W_t
    are a product with the specification, whose gradient is a matrix product, not a
    scatter-add of indexed rows (whose summation order changes from call to call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        layer = nn.Linear(64, 10)
        hidden = Interval(torch.rand(256, 64, generator=generator), torch.full((256, 64), 0.01))
        y = torch.randint(0, 10, (256,), generator=generator)
        upstream = torch.randn(256, 9, generator=generator)
        grads = []
        for _ in range(8):
            layer.zero_grad()
            (ibp.last_layer_margins(layer, hidden, y, sound=False) * upstream).sum().backward()
            grads.append((layer.weight.grad.clone(), layer.bias.grad.clone()))
        for weight, bias in grads[1:]:
            assert torch.equal(weight, grads[0][0]) and torch.equal(bias, grads[0][1])
        with torch.no_grad():
            expected = layer.weight[y][:, None] - layer.weight[other_classes(y, 10)]
            folded, _ = folded_margin_layer(layer, y)
        assert torch.equal(folded, expected)  # the same single rounding of W_y - W_t
    finally:
        torch.set_num_threads(threads)
