"""Certificates under floating-point rounding: networks built so that float32 arithmetic goes
wrong where it can (cancellation in a layer's sum, deep products, inputs on the ulp grid), the
true margins worked out in float64 at the worst input of the ball."""

import copy

import pytest
import torch
from torch import nn

import acert.bounds as bounds
from acert.bounds import ibp as ibp_rules
from acert.bounds import margin_bounds
from acert.bounds.interval import input_box
from acert.evaluation.evaluate import float64_violations
from acert.foundation.errors import AcertError, UnsupportedModelError
from acert.models import Normalize
from acert.radius import radius_search

METHODS = tuple(bounds.METHODS)


def _with(model: nn.Sequential, **weights: list) -> nn.Sequential:
    with torch.no_grad():
        for name, value in weights.items():
            index, kind = name.split("_")
            getattr(model[int(index)], kind).copy_(torch.tensor(value))
    return model.eval()


def _margin64(model: nn.Sequential, x: torch.Tensor) -> float:
    """``f_0 - f_1`` of the network in float64 (exact enough here) at one input."""
    out = copy.deepcopy(model).double()(x.double())
    return (out[0, 0] - out[0, 1]).item()


def test_cancellation_in_a_single_neuron_is_not_certified():
    """relu(w·x + b) with w·x ≈ -b: float32's error in w·x is ~1e-4 here, the margin 1.7e-9
    below zero at x + eps (Gowal-style IBP used to certify it)."""
    model = _with(
        nn.Sequential(Normalize([0.0], [1.0]), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)),
        **{
            "1_weight": [[4671.44775390625]],
            "1_bias": [-2217.4716796875],
            "3_weight": [[0.0], [1.0]],
            "3_bias": [0.26060888171195984, 0.0],
        },
    )
    x, y, eps = torch.tensor([[0.47472670674324036]]), torch.tensor([0]), 2.0**-16
    assert _margin64(model, x + eps) < 0  # x + eps is in the ball and exact in float32
    for method in METHODS:
        assert margin_bounds(model, x, y, eps, method).min() <= 0, method
    radius = radius_search(model, x, y, 2.0**-15, "ibp").radius
    assert radius.item() < eps


def test_cancelling_first_layer_does_not_make_crown_over_certify():
    """Two inputs that cancel in a wide first layer: CROWN used to take that layer's bounds
    from IBP without an allowance, and its bias terms cancelled as well."""
    w, beta = 14528.7900390625, 0.028144458308815956
    model = _with(
        nn.Sequential(Normalize([0.0], [1.0]), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)),
        **{
            "1_weight": [[w, -w], [-w, w]],
            "1_bias": [0.0, 0.0],
            "3_weight": [[0.0, 0.0], [1.0, 1.0]],
            "3_bias": [beta, 0.0],
        },
    )
    x = torch.tensor([[0.4764302372932434, 0.4764302670955658]])
    y, eps = torch.tensor([0]), 2.0**-20
    worst = x + torch.tensor([[-eps, eps]])
    assert _margin64(model, worst) < 0
    for method in METHODS:
        assert margin_bounds(model, x, y, eps, method).min() <= 0, method


def test_deep_narrow_net_certificates_hold_in_float64():
    """Ten layers of 16 at twice the default scale and a cap of 1e-5: float32 IBP errors of
    ~4e-4 used to exceed the final allowance."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [Normalize([0.1307], [0.3081])]
    for _ in range(10):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(16, 10)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    x = torch.rand(64, 16)
    mask = torch.rand_like(x)
    x[mask < 0.3], x[mask > 0.7] = 0.0, 1.0
    y = model(x).argmax(1)
    for method in METHODS:
        radius = radius_search(model, x, y, 1e-5, method).radius
        assert (radius > 0).sum() >= 8, method  # certificates to check, not a vacuous pass
        assert float64_violations(model, x, y, radius, method).numel() == 0, method


def test_reported_radii_certify_when_recomputed_on_the_whole_batch():
    """The search evaluates only the samples still open; the same bound on the whole batch
    rounds differently. Its safety floor keeps every reported radius certified there too."""
    failures = total = 0
    for seed in range(12):
        torch.manual_seed(seed)
        model = nn.Sequential(
            Normalize([0.3], [0.4]),
            nn.Linear(4, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.Linear(6, 5),
            nn.ReLU(),
            nn.Linear(5, 4),
        ).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(2.0)
            model[2].running_var.uniform_(0.1, 3)
            model[2].running_mean.uniform_(-1, 1)
        x = torch.rand(24, 4)
        y = model(x).argmax(1)
        for method in ("ibp", "crown"):
            radius = radius_search(model, x, y, 0.3, method).radius
            bound = margin_bounds(model, x, y, radius, method).min(1).values
            failures += int(((radius > 0) & (bound <= 0)).sum())
            total += int((radius > 0).sum())
    assert total > 400 and failures == 0


def test_training_passes_are_plain_and_certificates_are_widened():
    """A training objective's IBP pass keeps the plain interval (widening it would swamp the
    warm-up's ε = 1e-6 intervals); the certificate's pass contains it."""
    torch.manual_seed(1)
    model = nn.Sequential(
        Normalize([0.5], [0.25]), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()
    box = input_box(torch.rand(5, 6), 1e-6)
    plain, _ = ibp_rules.propagate(model[:-1], box, sound=False)
    sound, _ = ibp_rules.propagate(model[:-1], box, sound=True)
    assert torch.equal(plain.centre, sound.centre)
    assert (sound.radius >= plain.radius).all()
    assert (sound.radius > plain.radius)[plain.radius > 0].all()  # inactive units stay (0, 0)
    assert (sound.radius - plain.radius <= 1e-3 * (plain.centre.abs() + plain.radius)).all()


def test_inputs_in_another_dtype_than_the_model_are_refused():
    model = nn.Sequential(Normalize([0.0], [1.0]), nn.Linear(1, 2)).double()
    with pytest.raises(AcertError, match=r"inputs are torch\.float32 but the model computes in"):
        margin_bounds(model, torch.rand(2, 1), torch.tensor([0, 1]), 0.1)


def test_a_flatten_of_some_dims_is_refused():
    model = nn.Sequential(
        Normalize([0.5, 0.5], [0.3, 0.3]),
        nn.Flatten(2),
        nn.Linear(9, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    with pytest.raises(UnsupportedModelError, match=r"only nn\.Flatten"):
        margin_bounds(model, torch.rand(3, 2, 3, 3), torch.tensor([0, 1, 0]), 0.1)


# Red-team case 1: the exact margin of this net is -8.5e-5·x (class 1 everywhere), while its
# float32 logits are ~1e4·x with rounding errors ~1e-3·x: the float32 prediction flips back and
# forth over [0, 1]. The backward coefficients cancel to 1e-4 while the terms that form them, and
# the model's own sums, are 1e8 times larger.
CANCELLING_W1 = [
    [1.2986961603164673],
    [1.671994924545288],
    [1.199515461921692],
    [1.9421131610870361],
    [1.365110158920288],
    [1.1054953336715698],
    [1.629108190536499],
    [1.927154541015625],
]
CANCELLING_W2 = [
    [-7819.5595703125, -5476.80419921875, -5763.8095703125, 8072.0712890625,
     -4731.90283203125, -7610.35205078125, -7400.2861328125, 19256.55859375],
    [2034.3936767578125, 7561.13623046875, -9346.8154296875, 9711.3359375,
     1132.356689453125, 8772.7607421875, -9830.7548828125, -9614.8916015625],
]  # fmt: skip


def _cancelling_net() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(1, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
    return _with(model, **{"0_weight": CANCELLING_W1, "2_weight": CANCELLING_W2})


def _flip_distance(model: nn.Sequential, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(B,) distance from each 1-d input to the nearest grid point where the float32 model's
    prediction differs from its prediction at the input (inf where none; 0 where the input
    itself is predicted otherwise inside the grid's batch)."""
    with torch.no_grad():
        own, along = model(x).argmax(1), model(grid.view(-1, 1)).argmax(1)
    other = along.unsqueeze(0) != own.unsqueeze(1)
    distance = (grid.view(1, -1) - x).abs()
    return torch.where(other, distance, torch.full_like(distance, float("inf"))).amin(1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", [1, 50])
def test_cancelling_backward_coefficients_do_not_certify_a_flipping_model(method, batch):
    """Red-team case 1: CROWN reported a radius of 0.39 at x = 0.5 (0.3 for a twin net only
    inside a batch of 50); the float32 model flips within 1e-4 of x."""
    model = _cancelling_net()
    grid = torch.linspace(0, 1, 20001)
    x = torch.cat([torch.tensor([[0.5]]), torch.rand(batch - 1, 1)])
    with torch.no_grad():
        y = model(x).argmax(1)
    radius = radius_search(model, x, y, 0.5, method).radius
    assert ((radius == 0) | (radius < _flip_distance(model, x, grid))).all(), radius


@pytest.mark.parametrize("method", METHODS)
def test_subnormal_logits_are_not_over_certified(method):
    """Red-team case 2: a last layer scaled by 2^-145 puts the logits in float32's subnormal
    range, where rounding is absolute, not relative: radii used to pass the flip points."""
    grid = torch.linspace(0, 1, 4001)
    for seed in range(8):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        with torch.no_grad():
            model[2].weight.mul_(2.0**-145)
            model[2].bias.mul_(2.0**-145)
        x = grid[::400].view(-1, 1)
        with torch.no_grad():
            y = model(x).argmax(1)
        radius = radius_search(model, x, y, 1.0, method).radius
        assert ((radius == 0) | (radius < _flip_distance(model, x, grid))).all(), (seed, radius)


@pytest.mark.parametrize("method", METHODS)
def test_float64_certificates_use_float64s_own_floor_and_hold(method):
    """The float64 counterpart of the subnormal case: a last layer scaled by 2^-1070 puts a
    float64 model's logits in float64's subnormal range (grid 2^-1074); the allowances come
    from float64's own constants, and no radius passes a flip of the float64 model."""
    grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
    flips = 0
    for seed in range(8):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
        with torch.no_grad():
            model[2].weight.mul_(2.0**-1070)
            model[2].bias.mul_(2.0**-1070)
        x = grid[::400].view(-1, 1)
        with torch.no_grad():
            y = model(x).argmax(1)
        distance = _flip_distance(model, x, grid)
        flips += int(torch.isfinite(distance).sum())
        radius = radius_search(model, x, y, 1.0, method).radius
        assert radius.dtype == torch.float64
        assert ((radius == 0) | (radius < distance)).all(), (seed, radius)
    assert flips > 0  # the construction does flip inside the cap
