"""Pooling layer kinds: AvgPool2d and MaxPool2d.

Average pooling is linear: a depthwise convolution with weights ``1/(kh·kw)`` (zero padding
counted in the divisor, as ``count_include_pad=True`` does), exact in every method, with the
rounding allowance of a convolution of fan-in ``kh·kw``.

Max pooling: IBP takes the maximum of each end. CROWN bounds each output y = max of a window
from below by the input with the largest lower bound (y >= x_i for every i of the window),
and from above by that same input where it is the maximum throughout the box (its lower bound
above every other upper bound: then y = x_i), else by the largest upper bound, a constant
(the relaxation of DeepPoly, Singh et al. 2019). Its backward step scatters the coefficients
onto the chosen inputs (``F.fold`` adds up overlapping windows), on the whole tensor or, on
patches, on each query's window (:func:`acert.bounds.windows.scatter_windows`), the chosen
input, the open windows and their upper bounds gathered per pixel like a ReLU's slopes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from acert.bounds.affine import conv_transpose_dense, spatial_shape
from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval
from acert.bounds.overflow import guard, peak
from acert.bounds.spec import rounding_gamma, underflow_floor
from acert.bounds.steps import (
    BackwardContext,
    BoxMap,
    Geometry,
    LayerKind,
    PatchContext,
    Relaxer,
    Step,
    StepError,
    dense_dot,
)
from acert.bounds.windows import Windows, conv_transpose_windows, scatter_windows, window_dot

__all__ = ["AVGPOOL2D", "MAXPOOL2D", "PoolRelaxation"]


def _geometry(layer: nn.Module) -> Geometry:
    dilation = _pair(getattr(layer, "dilation", 1))
    return Geometry(_pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding), dilation)


def _pool_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    return spatial_shape(shape, shape[0], _geometry(layer))


def _kernel_elements(layer: nn.Module) -> int:
    return math.prod(_pair(layer.kernel_size))


# --- average pooling ------------------------------------------------------------------------


def _avg_interval(step: Step, stats: BatchStats | None, sound: bool) -> BoxMap:
    """``(pool(c), pool(r))``, widened as a convolution of fan-in kh·kw + 1 is
    (:mod:`acert.bounds.affine`): input radius ``r + γ|c|``, weights ``(1 + γ)/(kh·kw)``; no
    certificate where a window's sum may overflow (:mod:`acert.bounds.overflow`)."""
    layer, terms = step.layer, _kernel_elements(step.layer) + 1

    def apply(box: Interval) -> Interval:
        centre = layer(box.centre)
        gamma = rounding_gamma(terms, centre.dtype) if sound else 0.0
        if gamma == 0:
            return Interval(centre, layer(box.radius))
        spread = box.radius + gamma * box.centre.detach().abs()
        radius = layer(spread) * (1 + gamma) + underflow_floor(terms, centre.dtype)
        # the model sums each window before it divides: up to kh·kw times the largest |x|
        return Interval(centre, guard(radius, peak(box), lambda top: top * (terms - 1)))

    return apply


def _avg_weight(layer: nn.Module, channels: int, like: Tensor) -> Tensor:
    kernel = _pair(layer.kernel_size)
    return torch.full((channels, 1, *kernel), 1 / math.prod(kernel), dtype=like.dtype,
                      device=like.device)  # fmt: skip


def _back_avg(step: Step, A: Tensor, bias: Tensor, ctx: BackwardContext) -> tuple[Tensor, Tensor]:
    channels = ctx.input_shape[0]
    weight = _avg_weight(step.layer, channels, A)
    geometry = _geometry(step.layer)
    return conv_transpose_dense(geometry, channels, weight, None, A, bias, ctx.input_shape)


def _patch_avg(
    step: Step, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[Windows, Tensor]:
    channels = ctx.input_shape[0]
    weight = _avg_weight(step.layer, channels, windows.coeffs)
    geometry = _geometry(step.layer)
    return conv_transpose_windows(geometry, channels, weight, None, windows, bias, ctx.input_shape)


def _avg_rounding(
    step: Step, stats: BatchStats | None, before: Interval, after: Interval
) -> StepError:
    """As :func:`acert.bounds.affine.affine_error` for the depthwise convolution."""
    h = torch.maximum(before.lower.abs(), before.upper.abs())
    kernel = _kernel_elements(step.layer)
    gamma = rounding_gamma(2 * kernel + 1, h.dtype)
    elementwise = gamma * step.layer(h) + underflow_floor(kernel + 1, h.dtype)
    absolute = underflow_floor(kernel, h.dtype) * h.flatten(1).sum(1)
    return StepError(elementwise, absolute)


def _check_avg(layer: nn.Module) -> str | None:
    if layer.ceil_mode:
        return "uses ceil_mode=True (windows of other sizes at the border); use ceil_mode=False"
    if layer.divisor_override is not None:
        return f"uses divisor_override={layer.divisor_override}; use the default divisor"
    if _pair(layer.padding) != (0, 0) and not layer.count_include_pad:
        return (
            f"uses padding={layer.padding} with count_include_pad=False (divisors that change "
            "at the border); use count_include_pad=True or padding=0"
        )
    return None


AVGPOOL2D = LayerKind(
    type=nn.AvgPool2d,
    shape=_pool_shape,
    interval=_avg_interval,
    backward=_back_avg,
    patches=_patch_avg,
    rounding=_avg_rounding,
    example=lambda: (nn.AvgPool2d(2, stride=1), (2, 4, 4)),
    check=_check_avg,
    input_rank=4,
    exactness="affine",
    window=_geometry,
)


# --- max pooling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolRelaxation:
    """Linear bounds of each window's maximum y (B, C, L windows), i the chosen input:
    ``x_i <= y <= decided·x_i + (1 - decided)·upper``.

    Attributes:
        index: (B, C, L) int64 position in the window of the input with the largest lower bound.
        decided: (B, C, L) 1 where that input is the maximum throughout the box, else 0.
        upper: (B, C, L) the window's largest upper bound.
        size: (H', W') the output's height and width, L = H'·W'.
    """

    index: Tensor
    decided: Tensor
    upper: Tensor
    size: tuple[int, int]


def _windows(layer: nn.Module, t: Tensor) -> Tensor:
    """(B, C, K, L) the K values of each of the L windows of ``t`` (B, C, H, W)."""
    g = _geometry(layer)
    columns = F.unfold(t, g.kernel, dilation=g.dilation, padding=0, stride=g.stride)
    return columns.view(t.shape[0], t.shape[1], math.prod(g.kernel), -1)


def _max_interval(step: Step, stats: BatchStats | None, sound: bool) -> BoxMap:
    """The maximum of each end, widened by the rounding of the ends and the centre/radius
    form (``γ₂·(|c| + r)``)."""
    layer = step.layer

    def apply(box: Interval) -> Interval:
        out = Interval.from_bounds(layer(box.lower), layer(box.upper))
        gamma = rounding_gamma(2, out.centre.dtype) if sound else 0.0
        if gamma == 0:
            return out
        with torch.no_grad():
            error = gamma * (out.centre.abs() + out.radius) + underflow_floor(2, out.centre.dtype)
        return Interval(out.centre, out.radius + error)

    return apply


def _relax_max(layer: nn.Module, pre: Interval) -> PoolRelaxation:
    lower, upper = _windows(layer, pre.lower), _windows(layer, pre.upper)
    best, index = lower.max(2)
    others = upper.scatter(2, index.unsqueeze(2), -math.inf).amax(2)
    # decided only with room for the rounding of the ends (ties stay undecided: the constant
    # upper line is then as tight)
    slack = rounding_gamma(4, best.dtype) * (best.abs() + others.abs().nan_to_num(posinf=0.0))
    decided = (best - slack > others).to(best.dtype)
    size = tuple(_pool_shape(layer, tuple(pre.lower.shape[1:]))[1:])
    return PoolRelaxation(index, decided, upper.amax(2), size)


def _undecided_max(layer: nn.Module, pre: Interval) -> Tensor:
    """The inputs that may be the maximum of a window whose maximum is not decided."""
    lower, upper = _windows(layer, pre.lower), _windows(layer, pre.upper)
    relax = _relax_max(layer, pre)
    open_window = relax.decided.unsqueeze(2) == 0
    candidates = (upper >= lower.amax(2, keepdim=True)) & open_window
    g = _geometry(layer)
    batch, _, height, width = pre.lower.shape
    counts = F.fold(
        candidates.to(lower.dtype).view(batch, -1, candidates.shape[-1]),
        (height, width), g.kernel, dilation=g.dilation, padding=0, stride=g.stride,
    )  # fmt: skip
    return counts > 0


def _back_max(step: Step, A: Tensor, bias: Tensor, ctx: BackwardContext) -> tuple[Tensor, Tensor]:
    relax = ctx.relaxation
    assert relax is not None
    index, decided, upper = (t[ctx.rows] for t in (relax.index, relax.decided, relax.upper))
    queries, specs = A.shape[:2]
    A = A.flatten(3)  # (Q, S, C, L)
    positive = A.clamp(min=0)
    negative = A - positive
    bias = bias + dense_dot(negative * (1 - decided.unsqueeze(1)), upper)
    chosen = positive + negative * decided.unsqueeze(1)
    g = _geometry(step.layer)
    channels, height, width = ctx.input_shape
    kernel = math.prod(g.kernel)
    spread = chosen.new_zeros(queries, specs, channels, kernel, A.shape[-1])
    where = index.view(queries, 1, channels, 1, -1).expand(queries, specs, channels, 1, -1)
    spread = spread.scatter(3, where, chosen.unsqueeze(3))
    A_in = F.fold(
        spread.view(queries * specs, channels * kernel, -1),
        (height, width), g.kernel, dilation=g.dilation, padding=0, stride=g.stride,
    )  # fmt: skip
    return A_in.view(queries, specs, channels, height, width), bias


def _max_table(relax: PoolRelaxation) -> tuple[Tensor, ...]:
    """Per output pixel (B, C, H', W'): the chosen input's position in its window, 1 where the
    window is open (the upper line is the constant) and that constant, ``upper·open``."""
    shape = (*relax.index.shape[:2], *relax.size)
    open_ = 1 - relax.decided
    return relax.index.view(shape), open_.view(shape), (relax.upper * open_).view(shape)


def _patch_max(
    step: Step, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[Windows, Tensor]:
    """:func:`_back_max` on windows: ``coeffs - negative·open`` (the lower line x_i for
    positive coefficients, x_i or the constant for negative ones) onto the chosen inputs, and
    ``negative·upper`` of the open windows into the bias."""
    assert ctx.relaxation is not None
    index, open_, constant = ctx.relaxation
    negative = windows.coeffs.clamp(max=0)
    bias = bias + window_dot(negative, constant)
    chosen = windows.coeffs - negative * open_.unsqueeze(1)
    moved = Windows(chosen, windows.origin, windows.rows)
    return scatter_windows(_geometry(step.layer), moved, index, ctx.input_shape), bias


def _max_rounding(layer: nn.Module, pre: Interval, relax: PoolRelaxation) -> StepError:
    """The sums of overlapping windows' coefficients (at most kh·kw per input), relative to
    the window's largest |x|, and ``A·upper`` summed over the whole layer."""
    with torch.no_grad():
        h = layer(torch.maximum(pre.lower.abs(), pre.upper.abs()))
        constant = (relax.upper.abs() * (1 - relax.decided)).view_as(h)
        terms = h[0].numel() + 4
        kernel = _kernel_elements(layer)
        elementwise = rounding_gamma(kernel + 4, h.dtype) * h
        elementwise = elementwise + rounding_gamma(terms, h.dtype) * constant
        absolute = underflow_floor(terms, h.dtype) * (h + constant).flatten(1).sum(1)
    return StepError(elementwise, absolute)


def _check_max(layer: nn.Module) -> str | None:
    if _pair(layer.padding) != (0, 0):
        return f"pads with -inf (padding={layer.padding}); use padding=0"
    if layer.ceil_mode:
        return "uses ceil_mode=True (windows of other sizes at the border); use ceil_mode=False"
    if layer.return_indices:
        return "returns indices besides the maximum; use return_indices=False"
    return None


MAXPOOL2D = LayerKind(
    type=nn.MaxPool2d,
    shape=_pool_shape,
    interval=_max_interval,
    backward=_back_max,
    patches=_patch_max,
    rounding=None,
    relaxer=Relaxer(_relax_max, _undecided_max, _max_rounding, _max_table),
    example=lambda: (nn.MaxPool2d(2, stride=1), (2, 4, 4)),
    check=_check_max,
    input_rank=4,
    exactness="relaxed",
    window=_geometry,
)
