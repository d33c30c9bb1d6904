"""Interval bound propagation (Gowal et al. 2019) in centre/radius form.

One rule per layer kind, collected in ``RULES``. An affine map ``z -> W z + b`` sends the box
(c, r) to (W c + b, |W| r); ReLU is applied to the ends; the margin specification is folded into
the last linear layer before the interval is applied (METHOD.md, "Threat model and certificates").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds.interval import Interval
from acert.bounds.layers import BatchStats, channel_affine, fold_batchnorm, folds_into
from acert.bounds.spec import other_classes, rounding_allowance
from acert.models import Normalize

__all__ = ["RULES", "last_layer_margins", "propagate"]


def _apply(layer: nn.Module, t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``layer``'s affine map (linear or convolution) with the given parameters."""
    if isinstance(layer, nn.Linear):
        return F.linear(t, weight, bias)
    return F.conv2d(t, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _affine_box(layer: nn.Module, box: Interval, weight: Tensor, bias: Tensor | None) -> Interval:
    return Interval(
        _apply(layer, box.centre, weight, bias), _apply(layer, box.radius, weight.abs(), None)
    )


def _linear(layer: nn.Linear, box: Interval, stats: BatchStats | None) -> Interval:
    return _affine_box(layer, box, layer.weight, layer.bias)


def _conv(layer: nn.Conv2d, box: Interval, stats: BatchStats | None) -> Interval:
    return _affine_box(layer, box, layer.weight, layer.bias)


def _with_batchnorm(
    layer: nn.Module, norm: nn.Module, box: Interval, stats: BatchStats | None
) -> Interval:
    """A linear/conv layer and the batch-norm after it as one affine map (fewer passes over h).

    ``BN(W h + b) = (s·W) h + (s·b + t)`` per output channel, and ``|s·W| = |s|·|W|``, so the
    interval is the one the two rules give one after the other.
    """
    return _affine_box(layer, box, *fold_batchnorm(layer, norm, stats))


def _channel_affine(layer: nn.Module, box: Interval, stats: BatchStats | None) -> Interval:
    scale, shift = channel_affine(layer, stats)
    shape = (1, -1) + (1,) * (box.centre.dim() - 2)
    return Interval(
        box.centre * scale.view(shape) + shift.view(shape), box.radius * scale.abs().view(shape)
    )


def _relu(layer: nn.ReLU, box: Interval, stats: BatchStats | None) -> Interval:
    """ReLU of both ends: an active unit (l >= 0) keeps (c, r), an inactive one (u <= 0) gets
    (0, 0), an unstable one [0, u] = (u/2, u/2); with ``h = relu(u)/2`` that is
    ``(max(c, h), min(r, h))``.

    The same interval as ``((relu(u) + relu(l))/2, (relu(u) - relu(l))/2)``, but an active
    unit's (c, r) is passed on exactly (``fl(c + r) <= 2c`` when ``c >= r``) instead of being
    recomputed from two nearly equal ends, which in float32 loses a radius below ~1e-7·|c|
    (the ε = 1e-6 passes of the warm-up); and it takes fewer passes over the tensors.
    """
    if torch.is_grad_enabled():
        half_upper = torch.relu(box.centre + box.radius) * 0.5
        return Interval(
            torch.maximum(box.centre, half_upper), torch.minimum(box.radius, half_upper)
        )
    # the same arithmetic with fewer fresh tensors: without autograd they are the main cost
    half_upper = torch.add(box.centre, box.radius).relu_().mul_(0.5)
    radius = torch.minimum(box.radius, half_upper)
    return Interval(torch.maximum(box.centre, half_upper, out=half_upper), radius)


def _flatten(layer: nn.Flatten, box: Interval, stats: BatchStats | None) -> Interval:
    return Interval(layer(box.centre), layer(box.radius))


Rule = Callable[[nn.Module, Interval, "BatchStats | None"], Interval]
RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv,
    Normalize: _channel_affine,
    nn.BatchNorm1d: _channel_affine,
    nn.BatchNorm2d: _channel_affine,
    nn.ReLU: _relu,
    nn.Flatten: _flatten,
}


def propagate(
    layers: Iterable[nn.Module], box: Interval, stats: BatchStats | None = None
) -> tuple[Interval, list[Interval]]:
    """Push an input box through ``layers``.

    Args:
        layers: modules with a rule in ``RULES``.
        box: interval of the first layer's input.
        stats: clean-batch statistics for train-mode batch-norms.

    Returns:
        the output interval and the input interval of every ReLU, in order.
    """
    preactivations: list[Interval] = []
    layers = list(layers)
    position = 0
    while position < len(layers):
        layer = layers[position]
        following = layers[position + 1] if position + 1 < len(layers) else None
        if isinstance(layer, nn.ReLU):
            preactivations.append(box)
        if folds_into(layer, following):
            box = _with_batchnorm(layer, following, box, stats)
            position += 2
            continue
        box = RULES[type(layer)](layer, box, stats)
        position += 1
    return box, preactivations


def last_layer_margins(layer: nn.Linear, box: Interval, y: Tensor) -> Tensor:
    """Lower bounds of ``f_y - f_t`` for t != y with the specification folded into ``layer``.

    Rows ``W_y - W_t`` and biases ``b_y - b_t`` form one linear map per sample, which is then
    applied to the interval of the layer's input.

    Args:
        layer: the last linear layer (K outputs).
        box: (B, D) interval of its input.
        y: (B,) labels.

    Returns:
        (B, K-1) lower bounds, classes t in increasing order with y left out, less the
        rounding allowance of :func:`acert.bounds.spec.rounding_allowance`.
    """
    others = other_classes(y, layer.out_features)
    weight = layer.weight[y].unsqueeze(1) - layer.weight[others]
    centre = torch.einsum("bkd,bd->bk", weight, box.centre)
    radius = torch.einsum("bkd,bd->bk", weight.abs(), box.radius)
    magnitude = torch.einsum("bkd,bd->bk", weight.abs(), box.centre.abs()) + radius
    if layer.bias is not None:
        bias = layer.bias[y].unsqueeze(1) - layer.bias[others]
        centre, magnitude = centre + bias, magnitude + bias.abs()
    return centre - radius - rounding_allowance(magnitude)
