"""Layer kinds that act elementwise or reshape: ReLU, LeakyReLU, Flatten, Identity and Dropout.

ReLU and LeakyReLU are one two-piece linear rule ``max(z, a·z)`` with a slope a in [0, 1]
(:func:`two_piece_linear`; ReLU's a = 0). IBP applies it to the ends of the interval. CROWN
relaxes it on its pre-activation bounds [l, u]: the upper line is the chord, the lower line has
slope 1 when u >= -l, else a (the adaptive rule, docs/METHOD.md "Threat model and
certificates"); stable units are exact.
Identity, and Dropout in eval mode, pass everything on unchanged; Dropout in train mode drops
inputs at random, so no certificate holds for it (refused when certifying; a training
objective bounds its eval-mode function).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from acert.bounds.allowances import rounding_gamma, underflow_floor
from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import (
    BackwardContext,
    BoxMap,
    LayerKind,
    PatchContext,
    Relaxer,
    StepError,
    WalkStep,
    dense_dot,
    same_shape,
)
from acert.bounds.windows import Windows, window_dot

__all__ = [
    "DROPOUT",
    "FLATTEN",
    "IDENTITY",
    "LEAKY_RELU",
    "RELU",
    "Relaxation",
    "relu_box",
    "relu_relaxation",
    "relu_step",
    "two_piece_box",
    "two_piece_linear",
    "two_piece_relaxation",
]


def relu_box(box: Interval) -> Interval:
    """ReLU of both ends: an active unit (l >= 0) keeps (c, r), an inactive one (u <= 0) gets
    (0, 0), an unstable one [0, u] = (u/2, u/2); with ``h = relu(u)/2`` that is
    ``(max(c, h), min(r, h))``.

    The same interval as ``((relu(u) + relu(l))/2, (relu(u) - relu(l))/2)``, but an active
    unit's (c, r) is passed on exactly (rounding is monotone, so the computed h lies in
    [r, c] when ``c >= r``) instead of being recomputed from two nearly equal ends, which in
    float32 loses a radius below ~1e-7·|c| (the ε = 1e-6 passes of the warm-up); and it takes
    fewer passes over the tensors.
    """
    if torch.is_grad_enabled():
        half_upper = torch.relu(box.centre + box.radius) * 0.5
        return Interval(
            torch.maximum(box.centre, half_upper), torch.minimum(box.radius, half_upper)
        )
    # the same arithmetic with fewer fresh tensors: without autograd they are the main cost
    half_upper = torch.lerp(box.centre, box.radius, 0.5).relu_()  # relu(u)/2 in two passes
    radius = torch.minimum(box.radius, half_upper)
    return Interval(torch.maximum(box.centre, half_upper, out=half_upper), radius)


@dataclass(frozen=True)
class Relaxation:
    """Linear bounds ``lower_slope·z <= relu(z) <= upper_slope·z + upper_intercept`` on [l, u]."""

    lower_slope: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor


def relu_relaxation(pre: Interval) -> Relaxation:
    """The CROWN relaxation of ReLU on the pre-activation interval ``pre`` (B, ...)."""
    lower, upper = pre.lower, pre.upper
    unstable = (lower < 0) & (upper > 0)
    active = (lower >= 0).to(lower.dtype)
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    upper_slope = torch.where(unstable, upper / width, active)
    upper_intercept = torch.where(unstable, -lower * upper_slope, torch.zeros_like(lower))
    lower_slope = torch.where(unstable, (upper >= -lower).to(lower.dtype), active)
    return Relaxation(lower_slope, upper_slope, upper_intercept)


def relu_step(pre: Interval, intercept: Tensor) -> StepError:
    """The rounding bound of a backward step through a ReLU relaxed on ``pre`` with upper
    intercepts ``intercept``: the slopes' products with A and the float relaxation lines, off
    relative to ``h̄``, and ``A · intercept`` summed over the whole layer."""
    with torch.no_grad():
        h = torch.maximum(pre.lower.abs(), pre.upper.abs())
        terms = h[0].numel() + 4
        elementwise = rounding_gamma(4, h.dtype) * (h + intercept.abs())
        elementwise = elementwise + rounding_gamma(terms, h.dtype) * intercept.abs()
        absolute = underflow_floor(terms, h.dtype) * (h + intercept.abs()).flatten(1).sum(1)
    return StepError(elementwise, absolute)


def two_piece_relaxation(pre: Interval, slope: float) -> Relaxation:
    """The CROWN relaxation of ``max(z, slope·z)`` (0 <= slope <= 1) on ``pre``: the chord
    above, below the line of slope 1 when u >= -l, else of ``slope`` (the adaptive rule)."""
    if slope == 0:
        return relu_relaxation(pre)
    lower, upper = pre.lower, pre.upper
    unstable = (lower < 0) & (upper > 0)
    stable = torch.where(lower >= 0, torch.ones_like(lower), torch.full_like(lower, slope))
    width = torch.where(unstable, upper - lower, torch.ones_like(lower))
    chord = (upper - slope * lower) / width
    upper_slope = torch.where(unstable, chord, stable)
    upper_intercept = torch.where(unstable, (slope - chord) * lower, torch.zeros_like(lower))
    adaptive = torch.where(upper >= -lower, torch.ones_like(lower), torch.full_like(lower, slope))
    lower_slope = torch.where(unstable, adaptive, stable)
    return Relaxation(lower_slope, upper_slope, upper_intercept)


def two_piece_box(box: Interval, slope: float, sound: bool) -> Interval:
    """``max(z, slope·z)`` (0 <= slope <= 1, increasing) of both ends; a ReLU's is
    :func:`relu_box`. A unit with l >= 0 keeps (c, r); the others take their ends' images,
    widened when ``sound`` for the rounding of ``slope·z`` in the model and of the ends."""
    if slope == 0:
        return relu_box(box)
    lower, upper = box.lower, box.upper
    low, high = torch.maximum(lower, slope * lower), torch.maximum(upper, slope * upper)
    image = Interval.from_bounds(low, high)
    radius = image.radius
    if sound:
        with torch.no_grad():
            error = rounding_gamma(2, low.dtype) * (low.abs() + high.abs())
            error = error + underflow_floor(2, low.dtype)
        radius = radius + error
    active = lower >= 0
    return Interval(
        torch.where(active, box.centre, image.centre), torch.where(active, box.radius, radius)
    )


def two_piece_linear(
    type: type[nn.Module], slope: Callable[[nn.Module], float], example: Callable[[], tuple]
) -> LayerKind:
    """The kind of a two-piece linear activation ``max(z, slope·z)``: ReLU (slope 0, whose
    rules are :func:`relu_box` and :func:`relu_relaxation`), LeakyReLU.

    Args:
        type: the module class.
        slope: ``layer -> slope`` below zero, in [0, 1] (the kind's check refuses others).
        example: the kind's example (see :class:`LayerKind`).
    """

    def interval(step: WalkStep, stats: BatchStats | None, sound: bool) -> BoxMap:
        a = slope(step.layer)
        if a == 0:
            return relu_box
        return lambda box: two_piece_box(box, a, sound)

    def relax(layer: nn.Module, pre: Interval) -> Relaxation:
        return two_piece_relaxation(pre, slope(layer))

    def check(layer: nn.Module) -> str | None:
        a = slope(layer)
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            return (
                f"has slope {a!r} ({a.__class__.__name__}) below zero; the bounds take a Python "
                "number in [0, 1]"
            )
        if not 0 <= a <= 1:
            return f"has slope {a} below zero; the bounds take slopes in [0, 1]"
        return None

    return LayerKind(
        type=type,
        shape=same_shape,
        interval=interval,
        backward=_back_relu,
        patches=_patch_relu,
        rounding=None,
        relaxer=Relaxer(relax, _unstable, _relu_rounding, _relu_table),
        example=example,
        check=check,
        exactness="relaxed",
        activation=True,
    )


def _back_relu(
    step: WalkStep, A: Tensor, bias: Tensor, ctx: BackwardContext
) -> tuple[Tensor, Tensor]:
    relax = ctx.relaxation
    assert relax is not None
    lower_slope, upper_slope, upper_intercept = (
        t[ctx.rows].unsqueeze(1)
        for t in (relax.lower_slope, relax.upper_slope, relax.upper_intercept)
    )
    positive = A.clamp(min=0)
    negative = A - positive
    bias = bias + dense_dot(negative, upper_intercept.squeeze(1))
    return positive * lower_slope + negative * upper_slope, bias


def _patch_relu(
    step: WalkStep, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[Windows, Tensor]:
    """The lower line for positive coefficients, the upper line and its intercept for
    negative ones, with the slopes gathered on the windows."""
    coeffs = windows.coeffs
    assert ctx.relaxation is not None
    lower_slope, slope_gap, intercept = ctx.relaxation
    negative = coeffs.clamp(max=0)
    bias = bias + window_dot(negative, intercept)
    # coeffs·lower + negative·(upper - lower): the dense pass's positive·lower + negative·upper
    # up to a rounding (none for a ReLU's lower slope of 0 or 1), in three passes, not five
    relaxed = coeffs * lower_slope.unsqueeze(1)
    relaxed.addcmul_(negative, slope_gap.unsqueeze(1))
    return Windows(relaxed, windows.origin, windows.rows), bias


def _unstable(layer: nn.Module, pre: Interval) -> Tensor:
    return (pre.lower < 0) & (pre.upper > 0)


def _relu_rounding(layer: nn.Module, pre: Interval, relaxation: Relaxation) -> StepError:
    return relu_step(pre, relaxation.upper_intercept)


def _relu_table(relax: Relaxation) -> tuple[Tensor, ...]:
    return relax.lower_slope, relax.upper_slope - relax.lower_slope, relax.upper_intercept


RELU = two_piece_linear(nn.ReLU, lambda layer: 0.0, lambda: (nn.ReLU(), (2, 4, 4)))
LEAKY_RELU = two_piece_linear(
    nn.LeakyReLU, lambda layer: layer.negative_slope, lambda: (nn.LeakyReLU(0.2), (2, 4, 4))
)


def _flatten_interval(step: WalkStep, stats: BatchStats | None, sound: bool) -> BoxMap:
    layer = step.layer
    return lambda box: Interval(layer(box.centre), layer(box.radius))


def _back_flatten(
    step: WalkStep, A: Tensor, bias: Tensor, ctx: BackwardContext
) -> tuple[Tensor, Tensor]:
    return A.reshape(*A.shape[:2], *ctx.input_shape), bias


def _check_flatten(layer: nn.Module) -> str | None:
    if (layer.start_dim, layer.end_dim) != (1, -1):
        return (
            f"flattens dims {layer.start_dim}..{layer.end_dim}; "
            "only nn.Flatten() of every dim after the batch is supported"
        )
    return None


FLATTEN = LayerKind(
    type=nn.Flatten,
    shape=lambda layer, shape: (math.prod(shape),),
    interval=_flatten_interval,
    backward=_back_flatten,
    patches=None,
    rounding=None,
    example=lambda: (nn.Flatten(), (2, 4, 4)),
    check=_check_flatten,
    aliases=True,
)


def _identity_interval(step: WalkStep, stats: BatchStats | None, sound: bool) -> BoxMap:
    return lambda box: box


def _back_identity(
    step: WalkStep, A: Tensor, bias: Tensor, ctx: BackwardContext
) -> tuple[Tensor, Tensor]:
    return A, bias


def _patch_identity(
    step: WalkStep, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[Windows, Tensor]:
    return windows, bias


IDENTITY = LayerKind(
    type=nn.Identity,
    shape=same_shape,
    interval=_identity_interval,
    backward=_back_identity,
    patches=_patch_identity,
    rounding=None,
    example=lambda: (nn.Identity(), (2, 4, 4)),
    aliases=True,
)


def _check_dropout_mode(layer: nn.Module) -> str | None:
    if layer.training and layer.p > 0:
        return (
            "drops inputs at random in train mode, so no input's prediction can be certified; "
            "call model.eval() first"
        )
    return None


DROPOUT = LayerKind(
    type=nn.Dropout,
    shape=same_shape,
    interval=_identity_interval,
    backward=_back_identity,
    patches=_patch_identity,
    rounding=None,
    example=lambda: (nn.Dropout(0.3).eval(), (2, 4, 4)),
    certify_check=_check_dropout_mode,
    aliases=True,
)
