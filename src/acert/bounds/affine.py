"""Layer kinds with weights: Linear and Conv2d, each with a batch-norm after it folded in.

IBP sends the box (c, r) to ``(W c + b, |W| r)``, widened by a bound on the rounding of the
model's and the bound's arithmetic, ``γ·(|W|(|c| + r) + |b|)`` with γ from
:func:`acert.bounds.spec.rounding_gamma` for its fan-in, inside the same radius pass (the input
radius becomes ``r + γ|c|``, the weights ``(1 + γ)|W|``, the radius bias ``γ|b|`` plus the
underflow floor of :func:`acert.bounds.spec.underflow_floor`). CROWN's backward step is the
transpose; its rounding is bounded by ``γ·(|W|·h̄ + |b|)`` on the step's output
(:mod:`acert.bounds.rounding`). The per-channel kinds are in :mod:`acert.bounds.normalisation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds.channels import (
    BatchStats,
    channel_affine,
    fold_batchnorm,
    folded_bias_magnitude,
    normalisation_reach,
)
from acert.bounds.interval import Interval
from acert.bounds.overflow import guard, peak
from acert.bounds.spec import rounding_gamma, underflow_floor
from acert.bounds.steps import (
    BackwardContext,
    BoxMap,
    Geometry,
    LayerKind,
    PatchContext,
    Step,
    StepError,
)
from acert.bounds.windows import Windows, conv_transpose_windows

__all__ = [
    "CONV2D",
    "LINEAR",
    "affine_error",
    "conv_transpose_dense",
    "fan_in",
    "fan_out",
    "spatial_shape",
]


def fan_in(layer: nn.Linear | nn.Conv2d) -> int:
    """Products summed into one output of the layer, its bias included."""
    if isinstance(layer, nn.Linear):
        return layer.in_features + 1
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size) + 1


def fan_out(layer: nn.Linear | nn.Conv2d) -> int:
    """Most products summed into one input coefficient of a backward step through ``layer``."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels // layer.groups * math.prod(layer.kernel_size)


def _weights(step: Step, stats: BatchStats | None) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of the step: the layer's own, or with its batch-norm folded in."""
    if step.norm is None:
        return step.layer.weight, step.layer.bias
    return fold_batchnorm(step.layer, step.norm, stats)


# --- IBP ------------------------------------------------------------------------------------


def _apply(layer: nn.Module, t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``layer``'s affine map (linear or convolution) with the given parameters."""
    if isinstance(layer, nn.Linear):
        return F.linear(t, weight, bias)
    return F.conv2d(t, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _affine_box(
    layer: nn.Module,
    weight: Tensor,
    bias: Tensor | None,
    bias_magnitude: Tensor | None = None,
    sound: bool = True,
    fold: FoldReach | None = None,
) -> BoxMap:
    """``(W c + b, |W| r)`` widened by the rounding of the layer (module docstring).

    Args:
        layer: the linear or convolution layer whose shape parameters apply.
        weight, bias: the affine map (the layer's own, or with a batch-norm folded in).
        bias_magnitude: Σ|terms| of a computed bias (a folded one), default ``|bias|``.
        sound: widen for rounding, and check the magnitudes the model's arithmetic forms
            (:mod:`acert.bounds.overflow`); False for the plain arithmetic of a training
            objective.
        fold: the batch-norm folded into ``weight`` and ``bias``, if any.
    """
    gamma = rounding_gamma(fan_in(layer), weight.dtype) if sound else 0.0
    if gamma == 0:
        abs_weight = weight.abs()

        def plain(box: Interval) -> Interval:
            centre = _apply(layer, box.centre, weight, bias)
            return Interval(centre, _apply(layer, box.radius, abs_weight, None))

        return plain
    wide_weight = (1 + gamma) * weight.abs()
    # the underflow of the layer's products, which no relative bound covers; a folded
    # batch-norm scales that of the layer's own sum z by |s|
    floor = underflow_floor(fan_in(layer), weight.dtype)
    radius_bias = torch.full(
        weight.shape[:1], floor, dtype=weight.dtype, device=weight.device
    ) if fold is None else floor * fold.scale.detach().abs().clamp(min=1)  # fmt: skip
    if bias is not None:
        magnitude = bias.abs() if bias_magnitude is None else bias_magnitude
        radius_bias = radius_bias + gamma * magnitude.detach()
    sums = _sum_reach(layer, fold)

    def widened(box: Interval) -> Interval:
        centre = _apply(layer, box.centre, weight, bias)
        magnitude = box.centre.detach().abs()
        top = peak(box, magnitude)
        # r + γ|c|; without autograd into the fresh |c| tensor itself
        out = None if torch.is_grad_enabled() else magnitude
        spread = torch.add(box.radius, magnitude, alpha=gamma, out=out)
        radius = _apply(layer, spread, wide_weight, radius_bias)
        return Interval(centre, guard(radius, top, sums))

    return widened


@dataclass(frozen=True)
class FoldReach:
    """A batch-norm folded into the layer before it: its scale s (C,) and what it forms from
    the layer's z (:func:`acert.bounds.channels.normalisation_reach`)."""

    scale: Tensor
    reach: tuple[Tensor, ...]


def _fold_reach(norm: nn.Module, stats: BatchStats | None) -> FoldReach:
    return FoldReach(channel_affine(norm, stats)[0], normalisation_reach(norm, stats))


def _sum_reach(layer: nn.Linear | nn.Conv2d, fold: FoldReach | None) -> Callable[[Any], Any]:
    """``peak -> magnitude``: a bound on what the model's sums reach for inputs with
    ``|h| <= peak`` (a float or a (B,) tensor): the layer's own partial sums ``|W|·peak + |b|``
    (the largest row sum of |W|), and with a folded batch-norm what it forms from that z."""
    with torch.no_grad():
        rows = float(layer.weight.detach().abs().flatten(1).sum(1).amax())
        bias = float(layer.bias.detach().abs().amax()) if layer.bias is not None else 0.0
        mean, factor, offset = (float(t) for t in fold.reach) if fold else (0.0, 0.0, 0.0)

    def reach(top: Any) -> Any:
        z = top * rows + bias
        if fold is None:
            return z
        normalised = (z + mean) * factor + offset
        return torch.maximum(z, normalised) if isinstance(z, Tensor) else max(z, normalised)

    return reach


def _affine_interval(step: Step, stats: BatchStats | None, sound: bool) -> BoxMap:
    """A linear/conv layer, and the batch-norm after it as part of the same map (fewer passes
    over h): ``BN(W h + b) = (s·W) h + (s·b + t)`` per output channel and ``|s·W| = |s|·|W|``,
    so the interval is the one the two maps give one after the other."""
    layer = step.layer
    if step.norm is None:
        return _affine_box(layer, layer.weight, layer.bias, sound=sound)
    weight, bias = fold_batchnorm(layer, step.norm, stats)
    magnitude = folded_bias_magnitude(layer, step.norm, stats)
    fold = _fold_reach(step.norm, stats) if sound else None
    return _affine_box(layer, weight, bias, magnitude, sound, fold)


# --- CROWN ----------------------------------------------------------------------------------


def _back_linear(
    step: Step, A: Tensor, bias: Tensor, ctx: BackwardContext
) -> tuple[Tensor, Tensor]:
    weight, layer_bias = _weights(step, ctx.stats)
    if layer_bias is not None:
        bias = bias + A @ layer_bias
    return A @ weight, bias


def conv_transpose_dense(
    geometry: Geometry,
    groups: int,
    weight: Tensor,
    layer_bias: Tensor | None,
    A: Tensor,
    bias: Tensor,
    input_shape: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """Through ``conv(h) = weight * h + layer_bias`` on dense coefficients (Q, S, C, H, W)."""
    queries, specs = A.shape[:2]
    if layer_bias is not None:
        bias = bias + A.sum((-2, -1)) @ layer_bias
    out_h, out_w = A.shape[-2:]
    in_h, in_w = input_shape[-2:]
    output_padding = tuple(
        size_in - ((size_out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
        for size_in, size_out, stride, pad, dil, k in zip(
            (in_h, in_w),
            (out_h, out_w),
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            geometry.kernel,
            strict=True,
        )
    )
    A_in = F.conv_transpose2d(
        A.flatten(0, 1),
        weight,
        None,
        geometry.stride,
        geometry.padding,
        output_padding,
        groups,
        geometry.dilation,
    )
    return A_in.view(queries, specs, *input_shape), bias


def _conv_geometry(layer: nn.Conv2d) -> Geometry:
    return Geometry(layer.kernel_size, layer.stride, layer.padding, layer.dilation)


def _back_conv(step: Step, A: Tensor, bias: Tensor, ctx: BackwardContext) -> tuple[Tensor, Tensor]:
    weight, layer_bias = _weights(step, ctx.stats)
    geometry, groups = _conv_geometry(step.layer), step.layer.groups
    return conv_transpose_dense(geometry, groups, weight, layer_bias, A, bias, ctx.input_shape)


def _patch_conv(
    step: Step, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[Windows, Tensor]:
    weight, layer_bias = _weights(step, ctx.stats)
    geometry, groups = _conv_geometry(step.layer), step.layer.groups
    return conv_transpose_windows(
        geometry, groups, weight, layer_bias, windows, bias, ctx.input_shape
    )


# --- rounding of the backward steps ---------------------------------------------------------


def affine_error(
    layer: nn.Linear | nn.Conv2d,
    weight: Tensor,
    bias_magnitude: Tensor | None,
    h: Tensor,
    floor_scale: Tensor | None = None,
) -> StepError:
    """``γ·(|W|·h̄ + |b|)`` for the fan-in and fan-out summed, plus the underflow floors (the
    layer's own scaled by ``floor_scale`` (C,), a folded batch-norm's ``max(1, |s|)``)."""
    terms = fan_in(layer) + fan_out(layer)
    gamma = rounding_gamma(terms, h.dtype)
    if isinstance(layer, nn.Linear):
        magnitude = F.linear(h, weight.abs(), bias_magnitude)
    else:
        magnitude = F.conv2d(
            h, weight.abs(), bias_magnitude, layer.stride, layer.padding, layer.dilation,
            layer.groups,
        )  # fmt: skip
    floor = underflow_floor(fan_in(layer), h.dtype)
    if floor_scale is not None:
        floor = floor * floor_scale.view(-1, *([1] * (magnitude.dim() - 2)))
    elementwise = gamma * magnitude + floor
    absolute = underflow_floor(fan_out(layer), h.dtype) * h.flatten(1).sum(1)
    return StepError(elementwise, absolute)


def _affine_rounding(
    step: Step, stats: BatchStats | None, before: Interval, after: Interval
) -> StepError:
    h = torch.maximum(before.lower.abs(), before.upper.abs())
    layer = step.layer
    if step.norm is None:
        bias = None if layer.bias is None else layer.bias.abs()
        return affine_error(layer, layer.weight, bias, h)
    weight, _ = fold_batchnorm(layer, step.norm, stats)
    scale = channel_affine(step.norm, stats)[0].abs().clamp(min=1)
    return affine_error(layer, weight, folded_bias_magnitude(layer, step.norm, stats), h, scale)


# --- the kinds ------------------------------------------------------------------------------


def spatial_shape(
    shape: tuple[int, ...], channels: int, geometry: Geometry
) -> tuple[int, int, int]:
    """(C, H, W) of a convolution's or pooling's output for a (C_in, H, W) input."""
    height, width = (
        (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        for size, k, stride, pad, dil in zip(
            shape[1:], geometry.kernel, geometry.stride, geometry.padding, geometry.dilation,
            strict=True,
        )
    )  # fmt: skip
    return channels, height, width


def _check_conv(layer: nn.Module) -> str | None:
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return (
            f"uses padding={layer.padding!r}, padding_mode={layer.padding_mode!r}; "
            "use integer zero padding"
        )
    return None


LINEAR = LayerKind(
    type=nn.Linear,
    shape=lambda layer, shape: (*shape[:-1], layer.out_features),
    interval=_affine_interval,
    backward=_back_linear,
    patches=None,
    rounding=_affine_rounding,
    example=lambda: (nn.Linear(6, 5), (6,)),
    input_rank=2,
    exactness="affine",
    folds_batchnorm=True,
)
CONV2D = LayerKind(
    type=nn.Conv2d,
    shape=lambda layer, shape: spatial_shape(shape, layer.out_channels, _conv_geometry(layer)),
    interval=_affine_interval,
    backward=_back_conv,
    patches=_patch_conv,
    rounding=_affine_rounding,
    example=lambda: (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 4, 4)),
    check=_check_conv,
    input_rank=4,
    exactness="affine",
    folds_batchnorm=True,
    window=_conv_geometry,
)
