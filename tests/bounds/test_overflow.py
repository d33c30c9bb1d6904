"""Magnitudes the model's own arithmetic forms and the bounds never hold: each network below
computes ±inf (or a subnormal value a batch-norm then amplifies) inside a box whose intervals
stay finite and ordinary, and its float32 prediction flips at a point every bound method
certified before these checks (acert.bounds.overflow)."""

import pytest
import torch
from torch import nn

import acert.bounds as bounds
from acert.bounds import margin_bounds
from acert.bounds.overflow import limit
from acert.radius import radius_search

METHODS = tuple(bounds.METHODS)


def _set(layer: nn.Module, **values: object) -> nn.Module:
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(torch.as_tensor(value, dtype=torch.float32))
    return layer


def _margin_layer(scale: float, threshold: float, inputs: int = 1) -> nn.Linear:
    """Margin ``f_0 - f_1 = threshold - scale·Σh``."""
    weight = [[-scale] * inputs, [0.0] * inputs]
    return _set(nn.Linear(inputs, 2), weight=weight, bias=[threshold, 0.0])


def _huge_then_tiny() -> nn.Sequential:
    """``3e38·(x_1 + x_2)`` then ``· 1e-38``: in range at x = (0.5, 0.5), ±inf from
    x_1 + x_2 > 1.14; the centre/radius IBP keeps (3e38, 6e37 at ε = 0.1) are finite."""
    return nn.Sequential(
        _set(nn.Linear(2, 1), weight=[[3e38, 3e38]], bias=[0.0]),
        _set(nn.Linear(1, 1), weight=[[1e-38]], bias=[0.0]),
        _margin_layer(1.0, 10.0),
    ).eval()


def _pooled_sum() -> nn.Sequential:
    """A 3×3 window of 8e37·x: the average is in range, the model's window sum is inf from
    x = 0.47 on (9·8e37·0.47 > 3.4e38), while every value the bounds hold is below 8.5e37."""
    return nn.Sequential(
        _set(nn.Conv2d(1, 1, 1), weight=[[[[8e37]]]], bias=[0.0]),
        nn.AvgPool2d(3),
        nn.Flatten(),
        _margin_layer(1e-38, 10.0),
    ).eval()


def _folded_overflow() -> nn.Sequential:
    """A batch-norm of scale 1e-38 after ``3e38·(x_1 + x_2)``: folded, the bounds see a layer of
    weights 3; the model's z = W x overflows before the batch-norm scales it."""
    norm = _set(nn.BatchNorm1d(1), running_mean=[0.0], running_var=[1.0], weight=[1e-38])
    return nn.Sequential(
        _set(nn.Linear(2, 1), weight=[[3e38, 3e38]], bias=[0.0]), norm, _margin_layer(1.0, 10.0)
    ).eval()


def _folded_subnormal() -> nn.Sequential:
    """z = 2^-145·x is subnormal: the model rounds it to the 2^-149 grid (x to sixteenths),
    and the batch-norm's scale 2^127 carries that error into the margin, ``0.55 - round(16x)/16``
    (the folded layer 2^-18·x has no subnormal product at all)."""
    norm = nn.BatchNorm1d(1, eps=0.0)
    _set(norm, running_mean=[0.0], running_var=[2.0**-40], weight=[2.0**107], bias=[0.0])
    return nn.Sequential(
        _set(nn.Linear(1, 1), weight=[[2.0**-145]], bias=[0.0]), norm, _margin_layer(2.0**18, 0.55)
    ).eval()


CASES = {
    "huge sum then tiny": (_huge_then_tiny, [[0.5, 0.5]], [[0.58, 0.58]]),
    "pooled sum overflow": (_pooled_sum, [[[[0.4] * 3] * 3]], [[[[0.48] * 3] * 3]]),
    "folded overflow": (_folded_overflow, [[0.5, 0.5]], [[0.58, 0.58]]),
    "folded subnormal": (_folded_subnormal, [[0.5]], [[0.54]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_float_model_flips_inside_the_box_and_no_method_certifies_it(case):
    build, clean, flipped = CASES[case]
    model, x, x_flip, y = build(), torch.tensor(clean), torch.tensor(flipped), torch.tensor([0])
    distance = (x_flip - x).abs().max().item()
    assert model(x).argmax(1).item() == 0 and torch.isfinite(model(x)).all()
    assert model(x_flip).argmax(1).item() == 1  # what the float32 model computes
    for method in METHODS:
        radius = radius_search(model, x, y, 0.1, method).radius.item()
        assert radius < distance, (method, radius)
        lower = margin_bounds(model, x, y, distance, method).min().item()
        assert lower == -torch.inf if "overflow" in case else lower <= 0


def test_ordinary_networks_are_far_below_the_limit():
    """The check is relative to a quarter of float32's largest value, 8.5e37."""
    assert limit(torch.float32) == pytest.approx(8.507e37, rel=1e-3)
    assert limit(torch.float64) > 1e307
