"""Interval bound propagation (Gowal et al. 2019) in centre/radius form.

One rule per layer kind, collected in ``RULES``. An affine map ``z -> W z + b`` sends the box
(c, r) to (W c + b, |W| r); ReLU is applied to the ends; the margin specification is folded into
the last linear layer before the interval is applied (METHOD.md, "Threat model and certificates").

Rounding: the intervals contain what the network computes in exact arithmetic and in its float
forward pass, not only what the bound's own float arithmetic happens to give. Each affine rule
widens its output radius by a bound on those rounding errors, ``γ·(|W|(|c| + r) + |b|)`` with γ from
:func:`acert.bounds.spec.rounding_gamma` for its fan-in, inside the same radius pass (the input
radius becomes ``r + γ|c|``, the weights ``(1 + γ)|W|``, the radius bias ``γ|b|`` plus the
underflow floor of :func:`acert.bounds.spec.underflow_floor`); the channel affine maps add
theirs elementwise, and the folded last layer subtracts
:func:`acert.bounds.spec.rounding_allowance` of the terms of both logits it compares
(``|W_y| + |W_t|``, which cannot cancel). Active ReLUs pass (c, r) on exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds.interval import Interval
from acert.bounds.layers import (
    BatchStats,
    channel_affine,
    channel_shift_magnitude,
    fold_batchnorm,
    folded_bias_magnitude,
    folds_into,
)
from acert.bounds.spec import (
    folded_margin_layer,
    margin_matrix,
    rounding_allowance,
    rounding_gamma,
    underflow_floor,
)
from acert.models import Normalize

__all__ = ["RULES", "BoxMap", "Program", "fan_in", "last_layer_margins", "prepare", "propagate"]


def _apply(layer: nn.Module, t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``layer``'s affine map (linear or convolution) with the given parameters."""
    if isinstance(layer, nn.Linear):
        return F.linear(t, weight, bias)
    return F.conv2d(t, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def fan_in(layer: nn.Linear | nn.Conv2d) -> int:
    """Products summed into one output of the layer, its bias included."""
    if isinstance(layer, nn.Linear):
        return layer.in_features + 1
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size) + 1


BoxMap = Callable[[Interval], Interval]
"""The interval of a layer's output from the interval of its input."""


def _affine_box(
    layer: nn.Module,
    weight: Tensor,
    bias: Tensor | None,
    bias_magnitude: Tensor | None = None,
    sound: bool = True,
) -> BoxMap:
    """``(W c + b, |W| r)`` widened by the rounding of the layer (module docstring).

    Args:
        layer: the linear or convolution layer whose shape parameters apply.
        weight, bias: the affine map (the layer's own, or with a batch-norm folded in).
        bias_magnitude: Σ|terms| of a computed bias (a folded one), default ``|bias|``.
        sound: widen for rounding; False for the plain arithmetic of a training objective.
    """
    gamma = rounding_gamma(fan_in(layer), weight.dtype) if sound else 0.0
    if gamma == 0:
        abs_weight = weight.abs()

        def plain(box: Interval) -> Interval:
            centre = _apply(layer, box.centre, weight, bias)
            return Interval(centre, _apply(layer, box.radius, abs_weight, None))

        return plain
    wide_weight = (1 + gamma) * weight.abs()
    # the underflow of the layer's products, which no relative bound covers
    radius_bias = torch.full(
        weight.shape[:1], underflow_floor(fan_in(layer), weight.dtype), dtype=weight.dtype,
        device=weight.device,
    )  # fmt: skip
    if bias is not None:
        magnitude = bias.abs() if bias_magnitude is None else bias_magnitude
        radius_bias = radius_bias + gamma * magnitude.detach()

    def widened(box: Interval) -> Interval:
        centre = _apply(layer, box.centre, weight, bias)
        magnitude = box.centre.detach().abs()
        # r + γ|c|; without autograd into the fresh |c| tensor itself
        out = None if torch.is_grad_enabled() else magnitude
        spread = torch.add(box.radius, magnitude, alpha=gamma, out=out)
        return Interval(centre, _apply(layer, spread, wide_weight, radius_bias))

    return widened


def _linear(layer: nn.Linear, stats: BatchStats | None, sound: bool = True) -> BoxMap:
    return _affine_box(layer, layer.weight, layer.bias, sound=sound)


def _conv(layer: nn.Conv2d, stats: BatchStats | None, sound: bool = True) -> BoxMap:
    return _affine_box(layer, layer.weight, layer.bias, sound=sound)


def _with_batchnorm(
    layer: nn.Module, norm: nn.Module, stats: BatchStats | None, sound: bool = True
) -> BoxMap:
    """A linear/conv layer and the batch-norm after it as one affine map (fewer passes over h).

    ``BN(W h + b) = (s·W) h + (s·b + t)`` per output channel, and ``|s·W| = |s|·|W|``, so the
    interval is the one the two rules give one after the other.
    """
    weight, bias = fold_batchnorm(layer, norm, stats)
    magnitude = folded_bias_magnitude(layer, norm, stats)
    return _affine_box(layer, weight, bias, magnitude, sound)


def _channel_affine(layer: nn.Module, stats: BatchStats | None, sound: bool = True) -> BoxMap:
    """``(c·s + t, r·|s|)`` per channel, widened by the rounding of ``c·s + t`` and of the
    parameters, relative to ``(|c| + r)·|s| + Σ|terms of t|``."""
    scale, shift = channel_affine(layer, stats)
    abs_scale = scale.abs()
    gamma = rounding_gamma(2, scale.dtype) if sound else 0.0
    with torch.no_grad():  # a bound on rounding, not part of the objective
        magnitude = channel_shift_magnitude(layer, stats) if gamma else None

    def apply(box: Interval) -> Interval:
        shape = (1, -1) + (1,) * (box.centre.dim() - 2)
        centre = box.centre * scale.view(shape) + shift.view(shape)
        radius = box.radius * abs_scale.view(shape)
        if gamma == 0:
            return Interval(centre, radius)
        with torch.no_grad():
            error = (box.centre.abs() + box.radius) * abs_scale.view(shape) + magnitude.view(shape)
            error = gamma * error + underflow_floor(2, scale.dtype)
        return Interval(centre, radius + error)

    return apply


def _relu_box(box: Interval) -> Interval:
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


def _relu(layer: nn.ReLU, stats: BatchStats | None, sound: bool = True) -> BoxMap:
    return _relu_box


def _flatten(layer: nn.Flatten, stats: BatchStats | None, sound: bool = True) -> BoxMap:
    return lambda box: Interval(layer(box.centre), layer(box.radius))


Rule = Callable[[nn.Module, "BatchStats | None", bool], BoxMap]
"""``rule(layer, stats, sound)``: the layer's interval map, its parameters (folded batch-norm,
``|W|``) computed once; ``sound`` widens it for the rounding of the layer's arithmetic
(certificates), False keeps the plain interval (training objectives, whose value at tiny ε the
widening would swamp). A map carries gradients to the parameters when made with autograd on."""
RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv,
    Normalize: _channel_affine,
    nn.BatchNorm1d: _channel_affine,
    nn.BatchNorm2d: _channel_affine,
    nn.ReLU: _relu,
    nn.Flatten: _flatten,
}


@dataclass(frozen=True)
class Program:
    """The interval maps of a chain of layers, prepared once for many boxes (a radius search
    evaluates the same network on many radii): batch-norm folded, ``|W|`` computed, for one
    set of batch statistics and one ``sound`` setting.

    Attributes:
        maps: one interval map per layer (per layer and its folded batch-norm).
        relu_inputs: the positions in ``maps`` of the ReLUs.
    """

    maps: tuple[BoxMap, ...]
    relu_inputs: frozenset[int]

    def __call__(self, box: Interval) -> tuple[Interval, list[Interval]]:
        """The output interval of ``box`` and the input interval of every ReLU, in order."""
        preactivations: list[Interval] = []
        for position, box_map in enumerate(self.maps):
            if position in self.relu_inputs:
                preactivations.append(box)
            box = box_map(box)
        return box, preactivations


def prepare(
    layers: Iterable[nn.Module], stats: BatchStats | None = None, sound: bool = True
) -> Program:
    """The :class:`Program` of ``layers``; each linear/conv layer followed by a batch-norm is one
    affine map (:func:`acert.bounds.layers.fold_batchnorm`).

    Args:
        layers: modules with a rule in ``RULES``.
        stats: clean-batch statistics for train-mode batch-norms.
        sound: widen every interval for rounding (see :data:`Rule`).
    """
    layers = list(layers)
    maps: list[BoxMap] = []
    relu_inputs: set[int] = set()
    position = 0
    while position < len(layers):
        layer = layers[position]
        following = layers[position + 1] if position + 1 < len(layers) else None
        if isinstance(layer, nn.ReLU):
            relu_inputs.add(len(maps))
        if folds_into(layer, following):
            maps.append(_with_batchnorm(layer, following, stats, sound))
            position += 2
            continue
        maps.append(RULES[type(layer)](layer, stats, sound))
        position += 1
    return Program(tuple(maps), frozenset(relu_inputs))


def propagate(
    layers: Iterable[nn.Module],
    box: Interval,
    stats: BatchStats | None = None,
    sound: bool = True,
) -> tuple[Interval, list[Interval]]:
    """Push an input box through ``layers``.

    Args:
        layers: modules with a rule in ``RULES``.
        box: interval of the first layer's input.
        stats: clean-batch statistics for train-mode batch-norms.
        sound: widen every interval for rounding (see :data:`Rule`).

    Returns:
        the output interval and the input interval of every ReLU, in order.
    """
    return prepare(layers, stats, sound)(box)


def last_layer_margins(layer: nn.Linear, box: Interval, y: Tensor, sound: bool = True) -> Tensor:
    """Lower bounds of ``f_y - f_t`` for t != y with the specification folded into ``layer``.

    Rows ``W_y - W_t`` and biases ``b_y - b_t`` form one linear map per sample, which is then
    applied to the interval of the layer's input.

    Args:
        layer: the last linear layer (K outputs).
        box: (B, D) interval of its input.
        y: (B,) labels.
        sound: subtract the rounding allowance of :func:`acert.bounds.spec.rounding_allowance`.

    Returns:
        (B, K-1) lower bounds, classes t in increasing order with y left out.
    """
    weight, bias = folded_margin_layer(layer, y)
    centre = torch.einsum("bkd,bd->bk", weight, box.centre)
    radius = torch.einsum("bkd,bd->bk", weight.abs(), box.radius)
    if bias is not None:
        centre = centre + bias
    if not sound:
        return centre - radius
    # the model computes z_y and z_t, each rounded relative to its own terms: |W_y| + |W_t|,
    # not |W_y - W_t|, which may cancel
    with torch.no_grad():
        spec = margin_matrix(y, layer.out_features, weight.dtype).abs()
        magnitude = torch.einsum(
            "bkd,bd->bk", spec @ layer.weight.abs(), box.centre.abs() + box.radius
        )
        if bias is not None:
            magnitude = magnitude + spec @ layer.bias.abs()
    return centre - radius - rounding_allowance(magnitude, fan_in(layer))
