"""Every layer kind of the table under every bound method and every soundness test.

Each kind's example (``LayerKind.example``) is placed in a small network; the bounds of every
method in ``bounds.METHODS`` must lie below the margins at sampled and attacked points of the
ball, below the exact minimum of the MILP verifier (tests/kit/exact.py), below the float32 and
float64 forward passes under rounding, and give certified radii that PGD cannot break and the
exact verifier certifies; IBP's and CROWN's bounds of every step's output must contain that
step's values at sampled points. A new kind or a new method gets all of these without a new
test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from acert.bounds import (
    LAYER_KINDS,
    METHODS,
    clean_forward,
    crown,
    ibp,
    input_box,
    margin_bounds,
    margin_bounds_on_box,
)
from acert.bounds.clean_pass import forward_with_stats
from acert.bounds.crown import crown_margins
from acert.bounds.kind_rules import LayerKind
from acert.bounds.kinds import walk
from acert.models import Normalize
from acert.radius import radius_search
from acert.radius.attacks import pgd_attack
from tests.kit.exact import exact_certified, exact_min_margins

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = pytest.mark.parametrize("kind", LAYER_KINDS, ids=lambda kind: kind.name)
ALL_METHODS = pytest.mark.parametrize("method", list(METHODS))
VECTOR = (4,)


def kind_network(kind: LayerKind, seed: int = 0) -> tuple[nn.Sequential, tuple[int, ...]]:
    """An eval-mode network around the kind's example and its per-sample input shape:
    Normalize, a layer that makes the example's input (Conv2d or Linear) and a ReLU, the
    example (a layer, or for a kind of several inputs a small GraphNet around one), then
    Flatten (if still an image), Linear(6), ReLU, Linear(3)."""
    torch.manual_seed(seed)
    module, shape = kind.example()
    if len(shape) == 3:
        layers = [Normalize([0.45], [0.3]), nn.Conv2d(1, shape[0], 3, padding=1)]
        in_shape: tuple[int, ...] = (1, *shape[1:])
    else:
        layers = [Normalize([0.4, 0.5, 0.6, 0.5], [0.3, 0.2, 0.3, 0.25]), nn.Linear(4, shape[0])]
        in_shape = VECTOR
    layers += [nn.ReLU(), module]
    with torch.no_grad():
        out = tuple(copy.deepcopy(module).eval()(torch.zeros(1, *shape)).shape[1:])
    if len(out) > 1:
        layers.append(nn.Flatten())
    layers += [nn.Linear(math.prod(out), 6), nn.ReLU(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).eval(), in_shape


def _inputs(shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed))
    flat = x.view(batch, -1)
    flat[:, 0], flat[:, -1] = 0.0, 1.0  # pixels on the domain's edges
    return x


def _predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    others = torch.stack([torch.tensor([t for t in range(3) if t != int(c)]) for c in y])
    return logits.gather(1, y[:, None]) - logits.gather(1, others)


def _train_batchnorms(model: nn.Module, x: torch.Tensor):
    """Batch-norms normalising with x's batch statistics (a training objective's bounds), an
    eval-mode copy that computes the same function, or None without batch-norms."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return None, model
    for norm in norms:
        norm.train()
    stats = clean_forward(model, x, update_running_stats=False)[1]
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer, ref in zip(model.modules(), reference.modules(), strict=True):
            if layer in stats:
                ref.running_mean.copy_(stats[layer][0])
                ref.running_var.copy_(stats[layer][1])
    return stats, reference


EPS = torch.tensor([0.0, 0.01, 0.04, 0.15, 0.6])


@KINDS
@ALL_METHODS
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bounds_are_below_sampled_and_attacked_margins(kind, method, mode):
    model, shape = kind_network(kind, seed=1)
    x = _inputs(shape, len(EPS), seed=2)
    y = _predicted(model, x)
    y[1] = (y[1] + 1) % 3
    stats, reference = _train_batchnorms(model, x) if mode == "train" else (None, model)
    if mode == "train" and stats is None:
        pytest.skip("no batch-norm: the same network as in eval mode")
    lb = margin_bounds(model, x, y, EPS, method, stats=stats)
    assert lb.shape == (len(EPS), 2) and torch.isfinite(lb).all()

    g = torch.Generator().manual_seed(3)
    lo, hi = (
        (x - EPS.view(-1, *[1] * len(shape))).clamp(0, 1),
        (x + EPS.view(-1, *[1] * len(shape))).clamp(0, 1),
    )
    u = torch.rand(len(EPS), 256, *shape, generator=g)
    u[:, 128:] = u[:, 128:].round()  # corners
    points = (lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)).flatten(0, 1)
    with torch.no_grad():
        sampled = _margins(reference(points), y.repeat_interleave(256)).view(len(EPS), 256, -1)
    assert (lb <= sampled.min(1).values).all()

    adversarial = pgd_attack(reference, x, y, EPS, steps=40, restarts=2, generator=g)
    with torch.no_grad():
        attacked = _margins(reference(adversarial), y)
        if stats is not None:  # the reference is the function the bounds see
            same = _margins(forward_with_stats(model, adversarial, stats), y)
            torch.testing.assert_close(attacked, same, atol=1e-5, rtol=1e-5)
    assert (lb <= attacked).all()


@KINDS
@ALL_METHODS
def test_bounds_are_below_the_exact_minimum(kind, method):
    model, shape = kind_network(kind, seed=4)
    x = _inputs(shape, 2, seed=5)
    y = _predicted(model, x)
    eps = torch.tensor([0.03, 0.1])
    lb = margin_bounds(model, x, y, eps, method)
    for i in range(2):
        exact = torch.from_numpy(exact_min_margins(model, x[i], int(y[i]), float(eps[i])))
        assert (lb[i].double() <= exact + 1e-6 * (1 + exact.abs())).all(), (lb[i], exact)


@KINDS
@ALL_METHODS
def test_certified_radii_hold_against_pgd_and_the_exact_verifier(kind, method):
    model, shape = kind_network(kind, seed=6)
    x = _inputs(shape, 3, seed=7)
    y = _predicted(model, x)
    radius = radius_search(model, x, y, 0.1, method).radius
    assert (radius > 0).any()
    g = torch.Generator().manual_seed(8)
    adversarial = pgd_attack(model, x, y, radius, steps=40, restarts=3, generator=g)
    with torch.no_grad():
        assert (model(adversarial).argmax(1) == y).all()
    for i in torch.nonzero(radius > 0).flatten().tolist():
        assert exact_certified(model, x[i], int(y[i]), float(radius[i]))


@KINDS
@ALL_METHODS
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_zero_eps_gives_the_clean_margins(kind, method, mode, exact_arithmetic):
    model, shape = kind_network(kind, seed=9)
    x = _inputs(shape, 4, seed=10)
    y = torch.tensor([0, 1, 2, 0])
    stats, reference = _train_batchnorms(model, x) if mode == "train" else (None, model)
    with torch.no_grad():
        clean = _margins(reference(x), y)
    lb = margin_bounds(model, x, y, 0.0, method, stats=stats)
    torch.testing.assert_close(lb, clean, atol=1e-5, rtol=1e-5)


def _scaled(model: nn.Sequential, factor: float) -> nn.Sequential:
    """Every weight of the model multiplied by ``factor``: larger terms, larger roundings."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                module.weight.mul_(factor)
    return model


@KINDS
@ALL_METHODS
def test_sound_bounds_stay_below_what_the_model_computes(kind, method):
    """Rounding: at ε = 0 and ε = 1e-7 a sound bound must not exceed the margins the float32
    model computes, nor those of its float64 copy, at any point of the ball; no tolerance."""
    model, shape = _scaled(kind_network(kind, seed=11)[0], 8.0), kind_network(kind)[1]
    x = _inputs(shape, 6, seed=12)
    y = _predicted(model, x)
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(13)
    for eps in (0.0, 1e-7):
        lb = margin_bounds(model, x, y, eps, method)
        points = [x] + [(x + eps * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
                        for _ in range(8)]  # fmt: skip
        for point in points:
            with torch.no_grad():
                assert (lb <= _margins(model(point), y)).all()
                assert (lb.double() <= _margins(model64(point.double()), y)).all()


@KINDS
@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_patches_give_the_dense_bounds(kind, intermediate):
    model, shape = kind_network(kind, seed=14)
    x = _inputs(shape, 3, seed=15)
    y = _predicted(model, x)
    box = input_box(x, torch.tensor([0.02, 0.05, 0.2]))
    with torch.no_grad():
        dense = crown_margins(model, box, y, intermediate=intermediate, use_patches=False)
        windowed = crown_margins(model, box, y, intermediate=intermediate, use_patches=True)
    torch.testing.assert_close(windowed, dense, atol=1e-5, rtol=1e-5)


@KINDS
@ALL_METHODS
def test_training_bounds_carry_gradients_to_every_parameter(kind, method):
    model, shape = kind_network(kind, seed=16)
    x = _inputs(shape, 4, seed=17)
    y = torch.tensor([0, 1, 2, 1])
    stats, _ = _train_batchnorms(model, x)
    lb = margin_bounds_on_box(model, input_box(x, 0.05), y, method, stats, sound=False)
    lb.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def _step_outputs(steps, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every step of the walk, computed by the modules themselves."""
    outputs = []
    with torch.no_grad():
        for step in steps:
            ins = [x if i == -1 else outputs[i] for i in step.inputs]
            h = step.kind.run(step, *ins)
            outputs.append(h if step.norm is None else step.norm(h))
    return outputs


def _assert_contains(interval, values: torch.Tensor, what: str, sound: bool) -> None:
    """Every sampled value (B, n, ...) inside the interval (B, ...) of its row: with no
    tolerance for sound bounds, up to float32 rounding for the plain ones."""
    lower, upper = interval.lower.unsqueeze(1), interval.upper.unsqueeze(1)
    slack = 0.0 if sound else 1e-5 * (1 + values.abs())
    assert (values >= lower - slack).all() and (values <= upper + slack).all(), what


@KINDS
@pytest.mark.parametrize("sound", [True, False])
def test_every_step_of_every_method_contains_its_sampled_values(kind, sound):
    """Per step, not only at the margins: IBP's interval of every step's output, and CROWN's
    bounds of every neuron of it (dense and, where the steps allow, on patches), contain the
    outputs of sampled points of the ball as the float32 modules compute them; both the sound
    bounds of certificates and the plain ones of training objectives."""
    model, shape = kind_network(kind, seed=18)
    x = _inputs(shape, 3, seed=19)
    box = input_box(x, torch.tensor([0.02, 0.1, 0.3]))
    g = torch.Generator().manual_seed(20)
    u = torch.rand(3, 200, *shape, generator=g)
    u[:, 100:] = u[:, 100:].round()
    points = (box.lower.unsqueeze(1) + u * (2 * box.radius).unsqueeze(1)).flatten(0, 1)
    steps = walk(model)
    values = [v.view(3, 200, *v.shape[1:]) for v in _step_outputs(steps, points)]
    seen = []
    with torch.no_grad():
        ibp.program(steps, None, sound).run(box, observe=lambda step, _, out: seen.append(out))
        for step, interval, value in zip(steps, seen, values, strict=True):
            _assert_contains(interval, value, f"IBP, step {step.index} ({step.kind.name})", sound)
        net = crown._prepare(list(model), box, None, "crown", 2**20, False, sound)
        for end in range(1, len(steps)):
            every = torch.ones_like(seen[end - 1].lower, dtype=torch.bool)
            for patches in (False, True):
                bound = crown._crown_preactivation(net, end, seen[end - 1], every, 2**20, patches)
                what = f"CROWN, {end} steps, patches {patches}"
                _assert_contains(bound, values[end - 1], what, sound)
