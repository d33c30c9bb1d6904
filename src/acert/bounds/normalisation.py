"""Layer kinds that are per-channel affine maps: Normalize, BatchNorm1d and BatchNorm2d
(:mod:`acert.bounds.channels` gives their scale and shift).

IBP maps (c, r) to ``(c·s + t, r·|s|)`` per channel, widened by the rounding of ``c·s + t`` and
of the parameters, and checked for overflow (:mod:`acert.bounds.overflow`); CROWN scales the
coefficients and adds ``A·t`` to the bias, with the rounding of that sum over the whole layer
(:mod:`acert.bounds.rounding`). A batch-norm right after a Linear or Conv2d is folded into that
layer's step instead (:mod:`acert.bounds.affine`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from acert.bounds.channels import (
    BatchStats,
    channel_affine,
    channel_shift_magnitude,
    normalisation_reach,
    uses_batch_stats,
)
from acert.bounds.interval import Interval
from acert.bounds.overflow import guard, peak
from acert.bounds.spec import rounding_gamma, underflow_floor
from acert.bounds.steps import (
    BackwardContext,
    BoxMap,
    LayerKind,
    PatchContext,
    Step,
    StepError,
    same_shape,
)
from acert.bounds.windows import Windows
from acert.models import Normalize

__all__ = ["BATCHNORM1D", "BATCHNORM2D", "NORMALIZE", "random_batchnorm"]


def _channel_interval(step: Step, stats: BatchStats | None, sound: bool) -> BoxMap:
    """``(c·s + t, r·|s|)`` per channel, widened by the rounding of ``c·s + t`` and of the
    parameters, relative to ``(|c| + r)·|s| + Σ|terms of t|``."""
    layer = step.layer
    scale, shift = channel_affine(layer, stats)
    abs_scale = scale.abs()
    gamma = rounding_gamma(2, scale.dtype) if sound else 0.0
    with torch.no_grad():  # a bound on rounding, not part of the objective
        magnitude = channel_shift_magnitude(layer, stats) if gamma else None
        mean, factor, offset = (
            (float(t) for t in normalisation_reach(layer, stats)) if gamma else (0.0,) * 3
        )

    def apply(box: Interval) -> Interval:
        shape = (1, -1) + (1,) * (box.centre.dim() - 2)
        centre = box.centre * scale.view(shape) + shift.view(shape)
        radius = box.radius * abs_scale.view(shape)
        if gamma == 0:
            return Interval(centre, radius)
        with torch.no_grad():
            error = (box.centre.abs() + box.radius) * abs_scale.view(shape) + magnitude.view(shape)
            error = gamma * error + underflow_floor(2, scale.dtype)
            top = peak(box)
        return Interval(centre, guard(radius + error, top, lambda h: (h + mean) * factor + offset))

    return apply


def _back_channel(
    step: Step, A: Tensor, bias: Tensor, ctx: BackwardContext
) -> tuple[Tensor, Tensor]:
    scale, shift = channel_affine(step.layer, ctx.stats)
    shape = (1, 1, -1) + (1,) * (A.dim() - 3)
    per_channel = A.flatten(3).sum(-1) if A.dim() > 3 else A
    # shift broadcasts like the forward pass does (Normalize may hold one value for all channels)
    return A * scale.view(shape), bias + per_channel @ shift.expand(per_channel.shape[-1])


def _patch_channel(
    step: Step, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[Windows, Tensor]:
    """Through ``h * scale + shift`` per channel (Normalize, BatchNorm2d)."""
    scale, shift = channel_affine(step.layer, ctx.stats)
    per_channel = windows.coeffs.sum((2, 3))
    # shift broadcasts like the forward pass does (Normalize may hold one value for all channels)
    bias = bias + per_channel @ shift.expand(per_channel.shape[-1])
    return Windows(windows.coeffs * scale, windows.origin, windows.rows), bias


def _channel_rounding(
    step: Step, stats: BatchStats | None, before: Interval, after: Interval
) -> StepError:
    h = torch.maximum(before.lower.abs(), before.upper.abs())
    scale, _ = channel_affine(step.layer, stats)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    shift = channel_shift_magnitude(step.layer, stats).expand(scale.shape).view(shape)
    terms = h[0].numel() + 4  # the backward pass sums A·shift over the whole layer
    magnitude = h * scale.abs().view(shape) + shift
    elementwise = rounding_gamma(terms, h.dtype) * magnitude + underflow_floor(4, h.dtype)
    return StepError(elementwise, underflow_floor(4, h.dtype) * h.flatten(1).sum(1))


def random_batchnorm(norm: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module:
    """``norm`` with random running statistics and affine parameters (for the examples)."""
    with torch.no_grad():
        c = norm.num_features
        norm.running_mean.copy_(0.5 * torch.randn(c))
        norm.running_var.copy_(0.3 + 2 * torch.rand(c))
        norm.weight.copy_(torch.randn(c))
        norm.bias.copy_(0.3 * torch.randn(c))
    return norm.eval()


def _check_fixed_statistics(layer: nn.Module) -> str | None:
    if not uses_batch_stats(layer):
        return None
    fix = (
        "call model.eval() first"
        if layer.running_mean is not None
        else "train it with track_running_stats=True, then call model.eval()"
    )
    return (
        "normalises with the statistics of the current batch, so no input's prediction can be "
        f"certified alone; {fix}"
    )


NORMALIZE = LayerKind(
    type=Normalize,
    shape=same_shape,
    interval=_channel_interval,
    backward=_back_channel,
    patches=_patch_channel,
    rounding=_channel_rounding,
    example=lambda: (Normalize([0.2, 0.6], [0.4, 1.1]), (2, 4, 4)),
)
BATCHNORM1D = LayerKind(
    type=nn.BatchNorm1d,
    shape=same_shape,
    interval=_channel_interval,
    backward=_back_channel,
    patches=None,
    rounding=_channel_rounding,
    example=lambda: (random_batchnorm(nn.BatchNorm1d(6)), (6,)),
    certify_check=_check_fixed_statistics,
)
BATCHNORM2D = LayerKind(
    type=nn.BatchNorm2d,
    shape=same_shape,
    interval=_channel_interval,
    backward=_back_channel,
    patches=_patch_channel,
    rounding=_channel_rounding,
    example=lambda: (random_batchnorm(nn.BatchNorm2d(2)), (2, 4, 4)),
    certify_check=_check_fixed_statistics,
    input_rank=4,
)
