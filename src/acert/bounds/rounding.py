"""What floating-point rounding can cost a backward (CROWN) pass, layer by layer.

A backward pass rewrites ``A · h_k`` (A the coefficients on the output of layer k) as
``A' · h_{k-1} + A · b`` through the layer's map. In floating point neither side is what the
exact network has: the model's forward pass computes ``h_k`` with a rounding error, and the pass
computes ``A' = A·W`` and ``A·b`` with errors of their own. Both are bounded by the *terms* of
the sums, not by their result: where large terms cancel (weights of 1e4 whose products sum to
1e-4), a bound relative to the final coefficients, or to the margin, is far too small.

For each layer (a linear/conv layer with a batch-norm folded into it counts as one), with
``h̄ = max(|l|, |u|)`` the magnitude of its input over the box (sound IBP intervals, which
contain the float forward pass), the rewrite is off by at most

    Σ |A| · elementwise  +  absolute

- ``elementwise`` (the layer's output shape): ``γ·(|W|·h̄ + |b|)`` for an affine layer, γ from
  :func:`acert.bounds.spec.rounding_gamma` for the products summed forwards (fan-in) and
  backwards (fan-out) together; the same with the per-channel scale and shift for Normalize
  and batch-norm; for a ReLU, ``γ·(h̄ + |intercept|)`` of its relaxation's slopes and lines
  and ``γ_n·|intercept|`` of the intercepts summed over the whole layer; plus the underflow floor
  of those sums
  (:func:`acert.bounds.spec.underflow_floor`) for the forward pass;
- ``absolute`` (one number per sample): the underflow of the products that form ``A'``, which
  no relative bound covers, ``floor(fan-out)·Σ h̄``.

The backward pass adds these up and subtracts them with the allowance of the input step
(:func:`acert.bounds.spec.input_lower_bound`). Flatten is exact. docs/ARCHITECTURE.md,
"Soundness", explains the rounding model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds import ibp
from acert.bounds.interval import Interval
from acert.bounds.layers import (
    BatchStats,
    channel_affine,
    channel_shift_magnitude,
    fold_batchnorm,
    folded_bias_magnitude,
    folds_into,
)
from acert.bounds.spec import rounding_gamma, underflow_floor
from acert.models import Normalize

__all__ = ["StepError", "fan_out", "relu_step", "step_errors"]


@dataclass(frozen=True)
class StepError:
    """The rounding bound of one backward step: ``Σ |A|·elementwise + absolute``.

    Attributes:
        elementwise: (B, *output shape of the step).
        absolute: (B,).
    """

    elementwise: Tensor
    absolute: Tensor

    def rows(self, rows: Tensor) -> StepError:
        """The bounds of the given batch rows (one per query)."""
        return StepError(self.elementwise[rows], self.absolute[rows])

    def cost(self, A: Tensor, dot: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """(Q, S) the bound for coefficients A (Q, S, ...) on this step's output, one batch
        row per query (see :meth:`rows`), ``dot`` the products of their layout."""
        return dot(A.abs(), self.elementwise) + self.absolute.unsqueeze(1)


def fan_out(layer: nn.Linear | nn.Conv2d) -> int:
    """Most products summed into one input coefficient of a backward step through ``layer``."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels // layer.groups * math.prod(layer.kernel_size)


def _affine(
    layer: nn.Linear | nn.Conv2d, weight: Tensor, bias_magnitude: Tensor | None, h: Tensor
) -> StepError:
    terms = ibp.fan_in(layer) + fan_out(layer)
    gamma = rounding_gamma(terms, h.dtype)
    if isinstance(layer, nn.Linear):
        magnitude = F.linear(h, weight.abs(), bias_magnitude)
    else:
        magnitude = F.conv2d(
            h, weight.abs(), bias_magnitude, layer.stride, layer.padding, layer.dilation,
            layer.groups,
        )  # fmt: skip
    elementwise = gamma * magnitude + underflow_floor(ibp.fan_in(layer), h.dtype)
    absolute = underflow_floor(fan_out(layer), h.dtype) * h.flatten(1).sum(1)
    return StepError(elementwise, absolute)


def _channel_affine(layer: nn.Module, stats: BatchStats | None, h: Tensor) -> StepError:
    scale, _ = channel_affine(layer, stats)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    shift = channel_shift_magnitude(layer, stats).expand(scale.shape).view(shape)
    terms = h[0].numel() + 4  # the backward pass sums A·shift over the whole layer
    magnitude = h * scale.abs().view(shape) + shift
    elementwise = rounding_gamma(terms, h.dtype) * magnitude + underflow_floor(4, h.dtype)
    return StepError(elementwise, underflow_floor(4, h.dtype) * h.flatten(1).sum(1))


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


def step_errors(
    layers: Sequence[nn.Module], box: Interval, stats: BatchStats | None
) -> dict[int, StepError]:
    """The rounding bound of every backward step through an affine layer, keyed by the
    position of the step's last layer (a batch-norm's, when it is folded into the layer before
    it); Flatten has none, and a ReLU's comes with its relaxation (:func:`relu_step`).

    Args:
        layers: the network's layers.
        box: the input box (B, ...), clipped to the domain.
        stats: clean-batch statistics for train-mode batch-norms.
    """
    errors: dict[int, StepError] = {}
    position = 0
    with torch.no_grad():
        while position < len(layers):
            layer = layers[position]
            following = layers[position + 1] if position + 1 < len(layers) else None
            magnitude = torch.maximum(box.lower.abs(), box.upper.abs())
            if folds_into(layer, following):
                weight, _ = fold_batchnorm(layer, following, stats)
                bias = folded_bias_magnitude(layer, following, stats)
                errors[position + 1] = _affine(layer, weight, bias, magnitude)
                box = ibp.prepare([layer, following], stats)(box)[0]
                position += 2
                continue
            if isinstance(layer, nn.Linear | nn.Conv2d):
                bias = None if layer.bias is None else layer.bias.abs()
                errors[position] = _affine(layer, layer.weight, bias, magnitude)
            elif isinstance(layer, Normalize | nn.BatchNorm1d | nn.BatchNorm2d):
                errors[position] = _channel_affine(layer, stats, magnitude)
            box = ibp.RULES[type(layer)](layer, stats, True)(box)
            position += 1
    return errors
