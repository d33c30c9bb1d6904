"""CROWN's backward pass on patches for the neurons of the convolutional part of a network.

A neuron at (c, i, j) of a conv-stage layer depends only on a window of every earlier layer
(its receptive field), so its backward coefficients are kept on that window instead of on the
whole (C, H, W) tensor. Each query carries its own window origin in the coordinates of the
current layer tensor; all windows of a chunk have the same size. Through a convolution with
stride s, padding p, dilation d and kernel k a window of size n at origin o becomes the window
of size ``(n - 1)·s + d·(k - 1) + 1`` at origin ``s·o - p`` (``conv_transpose2d`` without
padding); BatchNorm2d / Normalize scale it per channel, a ReLU multiplies it by its relaxation
slopes gathered at the window's positions, and at the input it meets the box gathered there.

Zero padding: window positions outside the image are padding, where the layer input is 0
whatever the earlier layers compute. Their coefficients are set to 0 right after every
convolution transpose, so they add nothing to later shifts, biases, relaxations or the input
box; the values gathered at such positions only need to be finite (indices are clamped). A
window that grows to the image's size or beyond is replaced by the whole image (origin 0): from
there on it is the dense pass, never larger.

Coefficients are stored channels last, (Q, S, h, w, C), so that the per-pixel values gathered
for a window (relaxations, the input box; tables of shape (B, H, W, k·C)) are contiguous rows
and line up with them; the convolution transposes run in PyTorch's channels-last format.

The results equal the dense pass of :mod:`acert.bounds.crown` up to floating-point rounding:
the same relaxations, batch-norm folded into the convolution before it, the same rounding
allowance. Supported layers: Normalize, Conv2d (any stride, padding, dilation, groups),
BatchNorm2d and ReLU; the neurons after a Flatten or Linear stay on the dense pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds.interval import Interval
from acert.bounds.layers import channel_affine, fold_batchnorm, folds_into
from acert.bounds.spec import input_lower_bound
from acert.models import Normalize

if TYPE_CHECKING:
    from acert.bounds.crown import _Network

__all__ = ["Windows", "lower_bound", "preactivation_bounds", "supports"]

_PATCH_LAYERS = (Normalize, nn.Conv2d, nn.BatchNorm2d, nn.ReLU)

CPU_CHUNK_ELEMENTS = 2**22
"""Cap of a chunk's coefficient tensor on the CPU (16 MiB in float32), below the memory
budget: the passes over the coefficients then run from the caches, about 1.5x faster than
with chunks of the default budget (cnn7-tiny on MNIST)."""


@dataclass(frozen=True)
class Windows:
    """Linear functions of a (C, H, W) layer tensor, each supported on one window of it.

    Query q stands for ``Σ coeffs[q, s, a, b, c] · h[rows[q], c, origin[q, 0] + a,
    origin[q, 1] + b]``; coefficients at positions outside the image are 0.

    Attributes:
        coeffs: (Q, S, h, w, C) coefficients (channels last), S specification rows per query.
        origin: (Q, 2) int64 position of each window's top-left element (may be negative).
        rows: (Q,) batch row of each query.
    """

    coeffs: Tensor
    origin: Tensor
    rows: Tensor


@dataclass(frozen=True)
class _Tables:
    """Per-pixel values the backward pass gathers on windows: (B·H·W, C) rows, channels last.

    Attributes:
        relu: ReLU position -> its lower slope, upper minus lower slope, upper intercept.
        box: centre and radius of the input box.
        shapes: position (ReLU, or -1 for the input) -> (B, H, W) of its table.
        errors: position -> the elementwise rounding bound of the backward step there
            (:mod:`acert.bounds.rounding`) and the (B, H, W) of its table.
    """

    relu: dict[int, tuple[Tensor, ...]]
    box: tuple[Tensor, ...]
    shapes: dict[int, tuple[int, int, int]]
    errors: dict[int, tuple[Tensor, tuple[int, int, int]]]


def supports(layers: Sequence[nn.Module], shape: Sequence[int]) -> bool:
    """True when the output (C, H, W) of ``layers`` can be bounded on patches."""
    return len(shape) == 3 and all(type(layer) in _PATCH_LAYERS for layer in layers)


def _grown_window(layer: nn.Conv2d, size: Sequence[int]) -> list[int]:
    """(h, w) of the window in a convolution's input that a window of ``size`` positions of
    its output reaches (before it is cut to the image)."""
    return [
        (n - 1) * stride + dilation * (kernel - 1) + 1
        for n, stride, dilation, kernel in zip(
            size, layer.stride, layer.dilation, layer.kernel_size, strict=True
        )
    ]


def _window_elements(net: _Network, end: int, shape: Sequence[int]) -> int:
    """Largest number of coefficients of one specification row on the way back from
    the output of ``layers[:end]`` (shape (C, H, W)) to the input."""
    size = [1, 1]
    widest = shape[0]
    for position in range(end - 1, -1, -1):
        layer = net.layers[position]
        if isinstance(layer, nn.Conv2d):
            channels, *extents = net.input_shapes[position]
            grown = _grown_window(layer, size)
            widest = max(widest, channels * grown[0] * grown[1])
            size = [min(n, extent) for n, extent in zip(grown, extents, strict=True)]
    return widest


def _pixel_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The (B, C, H, W) tensors as contiguous (B·H·W, C) tables."""
    return tuple(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).contiguous() for t in tensors)


def _tables(net: _Network, end: int) -> _Tables:
    """The gather tables of the ReLUs in ``layers[:end]`` and of the input box."""
    relu, shapes = {}, {}
    for position in range(end):
        if isinstance(net.layers[position], nn.ReLU):
            relax = net.relaxations[position]
            relu[position] = _pixel_rows(
                relax.lower_slope, relax.upper_slope - relax.lower_slope, relax.upper_intercept
            )
            batch, _, height, width = relax.lower_slope.shape
            shapes[position] = (batch, height, width)
    batch, _, height, width = net.box.centre.shape
    shapes[-1] = (batch, height, width)
    errors = {}
    for position, step in net.errors.items():
        if position < end:
            batch, _, height, width = step.elementwise.shape
            errors[position] = (_pixel_rows(step.elementwise)[0], (batch, height, width))
    return _Tables(relu, _pixel_rows(net.box.centre, net.box.radius), shapes, errors)


def _gather(tables: Sequence[Tensor], shape: Sequence[int], windows: Windows) -> list[Tensor]:
    """(Q, h, w, C) the values of each table (B·H·W, C) on each query's window.

    Positions outside the image take the nearest border value (any finite value does: their
    coefficients are 0).

    Args:
        tables: (B·H·W, C) per-pixel rows.
        shape: (B, H, W).
        windows: the queries and their windows.
    """
    _, height, width = shape
    size = windows.coeffs.shape[2:4]
    device = windows.origin.device
    ys = (windows.origin[:, :1] + torch.arange(size[0], device=device)).clamp(0, height - 1)
    xs = (windows.origin[:, 1:] + torch.arange(size[1], device=device)).clamp(0, width - 1)
    pixels = (windows.rows.view(-1, 1, 1) * height + ys[:, :, None]) * width + xs[:, None, :]
    pixels = pixels.flatten()
    return [t.index_select(0, pixels).view(-1, *size, t.shape[1]) for t in tables]


def _window_dot(coeffs: Tensor, values: Tensor) -> Tensor:
    """(Q, S) ``Σ coeffs[q, s, ...] · values[q, ...]``.

    Args:
        coeffs: (Q, S, h, w, C).
        values: (Q, h, w, C).
    """
    return torch.bmm(coeffs.flatten(2), values.reshape(values.shape[0], -1, 1)).squeeze(-1)


def _fit(coeffs: Tensor, origin: Tensor, dim: int, extent: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut a window at least as large as the image along ``dim`` (2: rows, 3: columns) to the
    image itself (origin 0), and tell which window positions hold coefficients.

    Args:
        coeffs: (Q, S, h, w, C) coefficients.
        origin: (Q,) window origin along ``dim``.
        extent: image size along ``dim``.

    Returns:
        the coefficients, the new (Q,) origin and a (Q, size) mask of the positions inside the
        image (after a cut: inside the old window); the coefficients elsewhere must be zeroed.
    """
    size = coeffs.shape[dim]
    if size < extent:
        positions = origin.unsqueeze(1) + torch.arange(size, device=origin.device)
        return coeffs, origin, (positions >= 0) & (positions < extent)
    # window index of every image position; outside the old window the coefficient is 0
    index = torch.arange(extent, device=origin.device) - origin.unsqueeze(1)
    queries = torch.arange(coeffs.shape[0], device=origin.device).unsqueeze(1)
    coeffs = coeffs.movedim(dim, 1)[queries, index.clamp(0, size - 1)]
    coeffs = coeffs.movedim(1, dim).contiguous()
    return coeffs, torch.zeros_like(origin), (index >= 0) & (index < size)


def _back_conv(
    layer: nn.Conv2d,
    weight: Tensor,
    layer_bias: Tensor | None,
    windows: Windows,
    bias: Tensor,
    in_shape: Sequence[int],
) -> tuple[Windows, Tensor]:
    """Through ``conv(h) = weight * h + layer_bias`` (the layer's stride, padding, dilation)."""
    queries, specs, height, width, channels = windows.coeffs.shape
    if layer_bias is not None:
        bias = bias + windows.coeffs.sum((2, 3)) @ layer_bias
    nchw = windows.coeffs.reshape(queries * specs, height, width, channels).permute(0, 3, 1, 2)
    grown = F.conv_transpose2d(
        nchw, weight, None, layer.stride, 0, 0, layer.groups, layer.dilation
    ).permute(0, 2, 3, 1)
    coeffs = grown.reshape(queries, specs, *grown.shape[1:])
    stride = torch.tensor(layer.stride, device=windows.origin.device)
    padding = torch.tensor(layer.padding, device=windows.origin.device)
    origin = windows.origin * stride - padding
    coeffs, rows_origin, rows_inside = _fit(coeffs, origin[:, 0], 2, in_shape[1])
    coeffs, cols_origin, cols_inside = _fit(coeffs, origin[:, 1], 3, in_shape[2])
    inside = rows_inside[:, None, :, None, None] & cols_inside[:, None, None, :, None]
    if not bool(inside.all()):
        # the padding: the layer input is 0 there, whatever earlier layers compute
        coeffs = coeffs.mul_(inside)
    return Windows(coeffs, torch.stack([rows_origin, cols_origin], 1), windows.rows), bias


def _back_channel_affine(
    layer: nn.Module, windows: Windows, bias: Tensor, net: _Network
) -> tuple[Windows, Tensor]:
    """Through ``h * scale + shift`` per channel (Normalize, BatchNorm2d)."""
    scale, shift = channel_affine(layer, net.stats)
    per_channel = windows.coeffs.sum((2, 3))
    # shift broadcasts like the forward pass does (Normalize may hold one value for all channels)
    bias = bias + per_channel @ shift.expand(per_channel.shape[-1])
    return Windows(windows.coeffs * scale, windows.origin, windows.rows), bias


def _back_relu(
    position: int, windows: Windows, bias: Tensor, tables: _Tables
) -> tuple[Windows, Tensor]:
    """Through the relaxation of the ReLU at ``position``: the lower line for positive
    coefficients, the upper line and its intercept for negative ones."""
    coeffs = windows.coeffs
    lower_slope, slope_gap, intercept = _gather(
        tables.relu[position], tables.shapes[position], windows
    )
    negative = coeffs.clamp(max=0)
    bias = bias + _window_dot(negative, intercept)
    # coeffs·lower + negative·(upper - lower): the lower slope is 0 or 1, so this is the dense
    # pass's positive·lower + negative·upper up to a rounding, in three passes instead of five
    relaxed = coeffs * lower_slope.unsqueeze(1)
    relaxed.addcmul_(negative, slope_gap.unsqueeze(1))
    return Windows(relaxed, windows.origin, windows.rows), bias


def _input_bound(windows: Windows, bias: Tensor, bias_magnitude: Tensor, tables: _Tables) -> Tensor:
    """(Q, S) minimum over the input box, less the rounding allowance, as in the dense pass."""
    centre, radius = _gather(tables.box, tables.shapes[-1], windows)
    terms = tables.box[0].shape[1] * math.prod(tables.shapes[-1][1:])  # the dense pass's
    return input_lower_bound(
        windows.coeffs, bias, bias_magnitude, centre, radius, _window_dot, terms
    )


def lower_bound(
    net: _Network, end: int, windows: Windows, bias: Tensor, tables: _Tables | None = None
) -> Tensor:
    """Minimum over the input box of the windowed functions of the output of ``layers[:end]``.

    Args:
        net: the prepared network; ``layers[:end]`` must satisfy :func:`supports`.
        end: number of leading layers the functions sit on.
        windows: the functions, on windows of that output.
        bias: (Q, S) constants.
        tables: the gather tables of ``net`` (built when not given).

    Returns:
        (Q, S) lower bounds.
    """
    tables = _tables(net, end) if tables is None else tables
    position = end - 1
    bias_magnitude = bias.abs()  # Σ|each layer's contribution|, as in the dense pass
    error = torch.zeros_like(bias)  # the rounding of every step, as in the dense pass
    while position >= 0:
        layer = net.layers[position]
        before = net.layers[position - 1] if position > 0 else None
        previous = bias
        if position in tables.errors:
            table, shape = tables.errors[position]
            elementwise = _gather([table], shape, windows)[0]
            absolute = net.errors[position].absolute[windows.rows]
            error = error + _window_dot(windows.coeffs.abs(), elementwise) + absolute[:, None]
        if folds_into(before, layer):
            # batch-norm folded into the convolution before it, as in the dense pass
            weight, layer_bias = fold_batchnorm(before, layer, net.stats)
            shape = net.input_shapes[position - 1]
            windows, bias = _back_conv(before, weight, layer_bias, windows, bias, shape)
            position -= 2
        else:
            if isinstance(layer, nn.Conv2d):
                shape = net.input_shapes[position]
                windows, bias = _back_conv(layer, layer.weight, layer.bias, windows, bias, shape)
            elif isinstance(layer, nn.ReLU):
                windows, bias = _back_relu(position, windows, bias, tables)
            else:
                windows, bias = _back_channel_affine(layer, windows, bias, net)
            position -= 1
        bias_magnitude = bias_magnitude + (bias - previous).abs()
    return _input_bound(windows, bias, bias_magnitude, tables) - error


def _neuron_windows(rows: Tensor, neurons: Tensor, shape: Sequence[int], like: Tensor) -> Windows:
    """Windows of size 1 holding ``+e_n`` (spec row 0) and ``-e_n`` (spec row 1) per neuron.

    Args:
        rows: (Q,) batch rows.
        neurons: (Q,) flat indices into the (C, H, W) layer output.
        shape: (C, H, W).
        like: a tensor whose dtype and device the coefficients take.
    """
    channels, height, width = shape
    coeffs = torch.zeros(rows.numel(), 2, 1, 1, channels, dtype=like.dtype, device=like.device)
    queries = torch.arange(rows.numel(), device=rows.device)
    channel = torch.div(neurons, height * width, rounding_mode="floor")
    coeffs[queries, 0, 0, 0, channel] = 1.0
    coeffs[queries, 1, 0, 0, channel] = -1.0
    pixel = neurons % (height * width)
    origin = torch.stack([torch.div(pixel, width, rounding_mode="floor"), pixel % width], 1)
    return Windows(coeffs, origin, rows)


def preactivation_bounds(net: _Network, end: int, ibp_bounds: Interval, budget: int) -> Interval:
    """CROWN bounds of the (B, C, H, W) output of ``layers[:end]`` for its IBP-unstable
    neurons, intersected with IBP.

    The neurons of all samples are processed together, in chunks whose coefficient tensors
    (two specification rows per neuron, on the largest window of the way back) stay under
    ``budget`` elements (and ``CPU_CHUNK_ELEMENTS`` on the CPU).
    """
    lower, upper = ibp_bounds.lower.flatten(1).clone(), ibp_bounds.upper.flatten(1).clone()
    rows, neurons = torch.nonzero((lower < 0) & (upper > 0), as_tuple=True)
    shape = tuple(ibp_bounds.shape[1:])
    if lower.device.type == "cpu":
        budget = min(budget, CPU_CHUNK_ELEMENTS)
    chunk = max(1, budget // (2 * _window_elements(net, end, shape)))
    tables = _tables(net, end)
    for start in range(0, rows.numel(), chunk):
        r, n = rows[start : start + chunk], neurons[start : start + chunk]
        windows = _neuron_windows(r, n, shape, lower)
        bias = torch.zeros(r.numel(), 2, dtype=lower.dtype, device=lower.device)
        bounds = lower_bound(net, end, windows, bias, tables)
        lower[r, n] = torch.maximum(lower[r, n], bounds[:, 0])
        upper[r, n] = torch.minimum(upper[r, n], -bounds[:, 1])
    return Interval.from_bounds(lower.view_as(ibp_bounds.lower), upper.view_as(ibp_bounds.upper))
