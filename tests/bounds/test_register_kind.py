"""A user's own layer through ``acert.bounds.register_kind``: one entry, and every bound method
and every soundness test of tests/bounds/test_kinds.py take it (docs/ARCHITECTURE.md,
"Layer kinds", shows this example)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from acert.bounds import METHODS, kinds, margin_bounds, register_kind
from acert.bounds.allowances import rounding_gamma, underflow_floor
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import LayerKind, StepError, same_shape
from acert.bounds.windows import Windows
from acert.foundation.errors import ConfigError, UnsupportedModelError

from . import test_kinds

pytestmark = pytest.mark.usefixtures("single_thread")


class Scale(nn.Module):
    """``factor · x``: the user's layer."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


def _interval(step, stats, sound):
    factor = step.layer.factor

    def scale(box: Interval) -> Interval:
        centre, radius = box.centre * factor, box.radius * abs(factor)
        if sound:  # the model's product and ours, each off by u relative
            error = rounding_gamma(1, centre.dtype) * (centre.abs() + radius)
            radius = radius + error + underflow_floor(1, centre.dtype)
        return Interval(centre, radius)

    return scale


def _rounding(step, stats, before: Interval, after: Interval) -> StepError:
    h = torch.maximum(after.lower.abs(), after.upper.abs())
    zero = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    return StepError(rounding_gamma(1, h.dtype) * h + underflow_floor(1, h.dtype), zero)


SCALE = LayerKind(
    type=Scale,
    shape=same_shape,
    interval=_interval,
    backward=lambda step, A, bias, ctx: (A * step.layer.factor, bias),
    patches=lambda step, w, bias, ctx: (
        Windows(w.coeffs * step.layer.factor, w.origin, w.rows),
        bias,
    ),
    rounding=_rounding,
    example=lambda: (Scale(-1.5), (2, 4, 4)),
)


@pytest.fixture
def scale_kind():
    saved = list(kinds.LAYER_KINDS), list(kinds.SUPPORTED_LAYERS), dict(kinds._KINDS)
    yield register_kind(SCALE)
    kinds.LAYER_KINDS[:], kinds.SUPPORTED_LAYERS[:] = saved[0], saved[1]
    kinds._KINDS.clear()
    kinds._KINDS.update(saved[2])


def test_an_unregistered_layer_is_refused_and_a_registered_one_bounded(scale_kind):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), Scale(2.0), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    lb = margin_bounds(model.eval(), x, y, 0.01, "crown")
    assert lb.shape == (2, 1)
    kinds._KINDS.pop(Scale)
    with pytest.raises(UnsupportedModelError, match=r"layer 2 \(Scale\) has no bound rule"):
        margin_bounds(model.eval(), x, y, 0.01, "crown")


def test_a_type_with_a_kind_is_not_registered_again(scale_kind):
    with pytest.raises(ConfigError, match="Scale already has a kind"):
        register_kind(SCALE)
    with pytest.raises(ConfigError, match=r"takes an acert\.bounds\.kind_rules\.LayerKind"):
        register_kind(Scale)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_registered_kind_passes_the_soundness_tests_of_every_kind(scale_kind, method):
    test_kinds.test_bounds_are_below_sampled_and_attacked_margins(scale_kind, method, "eval")
    test_kinds.test_bounds_are_below_the_exact_minimum(scale_kind, method)
    test_kinds.test_certified_radii_hold_against_pgd_and_the_exact_verifier(scale_kind, method)
    test_kinds.test_sound_bounds_stay_below_what_the_model_computes(scale_kind, method)
    test_kinds.test_training_bounds_carry_gradients_to_every_parameter(scale_kind, method)


def test_a_registered_kind_is_contained_step_by_step_and_on_patches(scale_kind):
    for intermediate in ("ibp", "crown"):
        test_kinds.test_patches_give_the_dense_bounds(scale_kind, intermediate)
    for sound in (True, False):
        test_kinds.test_every_step_of_every_method_contains_its_sampled_values(scale_kind, sound)
