"""Linear functions of a (C, H, W) layer tensor kept on windows (CROWN on patches,
:mod:`acert.bounds.patches`): the windows, gathering per-pixel values on them, the
convolution transpose that grows them (convolutions, average pooling) and the scatter onto one
chosen input per pooling window (max pooling).

Zero padding: window positions outside the image are padding, where the layer input is 0
whatever the earlier layers compute. Their coefficients are set to 0 right after every
convolution transpose, so they add nothing to later shifts, biases, relaxations or the input
box; the values gathered at such positions only need to be finite (indices are clamped). A
window that grows to the image's size or beyond is replaced by the whole image (origin 0): from
there on it is the dense pass, never larger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from acert.bounds.steps import Geometry

__all__ = [
    "Windows",
    "add_windows",
    "conv_transpose_windows",
    "gather",
    "scatter_windows",
    "window_dot",
]


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


def gather(tables: Sequence[Tensor], shape: Sequence[int], windows: Windows) -> list[Tensor]:
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


def window_dot(coeffs: Tensor, values: Tensor) -> Tensor:
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


def _fit_image(coeffs: Tensor, origin: Tensor, rows: Tensor, in_shape: Sequence[int]) -> Windows:
    """Windows cut to the image where they reach beyond it, outside positions zeroed."""
    coeffs, rows_origin, rows_inside = _fit(coeffs, origin[:, 0], 2, in_shape[1])
    coeffs, cols_origin, cols_inside = _fit(coeffs, origin[:, 1], 3, in_shape[2])
    inside = rows_inside[:, None, :, None, None] & cols_inside[:, None, None, :, None]
    if not bool(inside.all()):
        # the padding: the layer input is 0 there, whatever earlier layers compute
        coeffs = coeffs.mul_(inside)
    return Windows(coeffs, torch.stack([rows_origin, cols_origin], 1), rows)


def conv_transpose_windows(
    geometry: Geometry,
    groups: int,
    weight: Tensor,
    layer_bias: Tensor | None,
    windows: Windows,
    bias: Tensor,
    in_shape: Sequence[int],
) -> tuple[Windows, Tensor]:
    """Through ``conv(h) = weight * h + layer_bias`` with the given geometry and groups.

    Args:
        in_shape: (C, H, W) of the convolution's input.
    """
    queries, specs, height, width, channels = windows.coeffs.shape
    if layer_bias is not None:
        bias = bias + windows.coeffs.sum((2, 3)) @ layer_bias
    nchw = windows.coeffs.reshape(queries * specs, height, width, channels).permute(0, 3, 1, 2)
    grown = F.conv_transpose2d(
        nchw, weight, None, geometry.stride, 0, 0, groups, geometry.dilation
    ).permute(0, 2, 3, 1)
    coeffs = grown.reshape(queries, specs, *grown.shape[1:])
    stride = torch.tensor(geometry.stride, device=windows.origin.device)
    padding = torch.tensor(geometry.padding, device=windows.origin.device)
    origin = windows.origin * stride - padding
    return _fit_image(coeffs, origin, windows.rows, in_shape), bias


def scatter_windows(
    geometry: Geometry, windows: Windows, index: Tensor, in_shape: Sequence[int]
) -> Windows:
    """Through a map whose output at each position reads one input of its pooling window (max
    pooling's relaxation lines, padding 0): each coefficient moves to the input at ``index``,
    its position in the window (row-major over the kernel, as ``F.unfold`` orders it), and
    overlapping windows add up (``F.fold``), as the dense rule does on the whole tensor.

    Args:
        windows: coefficients on windows of the map's output.
        index: (Q, h, w, C) int64 position of the chosen input in each output's window.
        in_shape: (C, H, W) of the map's input.
    """
    queries, specs, height, width, channels = windows.coeffs.shape
    kernel = geometry.kernel[0] * geometry.kernel[1]
    coeffs = windows.coeffs.permute(0, 1, 4, 2, 3).unsqueeze(3)  # (Q, S, C, 1, h, w)
    where = index.permute(0, 3, 1, 2).unsqueeze(1).unsqueeze(3).expand_as(coeffs)
    spread = coeffs.new_zeros(queries, specs, channels, kernel, height, width)
    spread.scatter_(3, where, coeffs)
    size = [
        (n - 1) * stride + dilation * (k - 1) + 1
        for n, stride, dilation, k in zip(
            (height, width), geometry.stride, geometry.dilation, geometry.kernel, strict=True
        )
    ]
    grown = F.fold(
        spread.view(queries * specs, channels * kernel, height * width), size,
        geometry.kernel, dilation=geometry.dilation, padding=0, stride=geometry.stride,
    )  # fmt: skip
    grown = grown.view(queries, specs, channels, *size).permute(0, 1, 3, 4, 2).contiguous()
    origin = windows.origin * torch.tensor(geometry.stride, device=windows.origin.device)
    return _fit_image(grown, origin, windows.rows, in_shape)


def _place(windows: Windows, origin: Tensor, size: Sequence[int]) -> Tensor:
    """(Q, S, *size, C) the coefficients of ``windows`` inside larger windows at ``origin``."""
    queries, specs, height, width, channels = windows.coeffs.shape
    placed = windows.coeffs.new_zeros(queries, size[0], size[1], specs, channels)
    offset = windows.origin - origin
    device = origin.device
    ys = offset[:, :1] + torch.arange(height, device=device)
    xs = offset[:, 1:] + torch.arange(width, device=device)
    queries_index = torch.arange(queries, device=device).view(-1, 1, 1)
    placed[queries_index, ys[:, :, None], xs[:, None, :]] = windows.coeffs.permute(0, 2, 3, 1, 4)
    return placed.permute(0, 3, 1, 2, 4)


def add_windows(first: Windows, second: Windows, in_shape: Sequence[int]) -> Windows:
    """``first + second`` (the same queries) on each query's smallest window holding both,
    cut to the image (a residual block's two branches meeting at its input).

    Args:
        in_shape: (C, H, W) of the tensor the windows lie on.
    """
    size_first = torch.tensor(first.coeffs.shape[2:4], device=first.origin.device)
    size_second = torch.tensor(second.coeffs.shape[2:4], device=first.origin.device)
    if bool((size_first == size_second).all()) and torch.equal(first.origin, second.origin):
        return Windows(first.coeffs + second.coeffs, first.origin, first.rows)
    origin = torch.minimum(first.origin, second.origin)
    end = torch.maximum(first.origin + size_first, second.origin + size_second)
    size = (end - origin).amax(0).tolist() if origin.numel() else [1, 1]
    coeffs = _place(first, origin, size) + _place(second, origin, size)
    return _fit_image(coeffs, origin, first.rows, in_shape)
