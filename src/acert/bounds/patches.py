"""CROWN's backward pass on patches for the neurons of the convolutional part of a network.

A neuron at (c, i, j) of a conv-stage layer depends only on a window of every earlier layer
(its receptive field), so its backward coefficients are kept on that window instead of on the
whole (C, H, W) tensor. Each query carries its own window origin in the coordinates of the
current layer tensor; all windows of a chunk have the same size. Through a convolution with
stride s, padding p, dilation d and kernel k a window of size n at origin o becomes the window
of size ``(n - 1)·s + d·(k - 1) + 1`` at origin ``s·o - p`` (``conv_transpose2d`` without
padding; average pooling alike); BatchNorm2d / Normalize scale it per channel, a ReLU multiplies
it by its relaxation slopes gathered at the window's positions, a max pooling moves each
coefficient onto its window's chosen input (growing the window as a convolution without padding
does), where several steps read a node (a residual block's two branches) their windows add up on
the smallest window holding them all, and at the input it meets the box gathered there. Each
step runs its kind's patch rule (``LayerKind.patches``, on
:class:`acert.bounds.windows.Windows`, which also explains the zero padding); a kind without
one (Flatten, Linear) ends the part bounded on patches.

Coefficients are stored channels last, (Q, S, h, w, C), so that the per-pixel values gathered
for a window (relaxations, the input box; tables of shape (B, H, W, k·C)) are contiguous rows
and line up with them; the convolution transposes run in PyTorch's channels-last format.

The results equal the dense pass of :mod:`acert.bounds.crown` up to floating-point rounding:
the same relaxations, batch-norm folded into the convolution before it, the same rounding
allowance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from acert.bounds.allowances import input_lower_bound
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import PatchContext, StepError, WalkStep
from acert.bounds.network import Network, Pending
from acert.bounds.windows import Windows, add_windows, gather, window_dot
from acert.models.graph import INPUT

__all__ = ["Windows", "lower_bound", "preactivation_bounds", "supports"]

CPU_CHUNK_ELEMENTS = 2**22
"""Cap of a chunk's coefficient tensor on the CPU (16 MiB in float32), below the memory
budget: the passes over the coefficients then run from the caches, about 1.5x faster than
with chunks of the default budget (cnn7-tiny on MNIST)."""


@dataclass(frozen=True)
class _Tables:
    """Per-pixel values the backward pass gathers on windows: (B·H·W, C) rows, channels last.

    Attributes:
        relaxations: step index -> its relaxation's table (``Relaxer.table``: for a ReLU its
            lower slope, upper minus lower slope and upper intercept).
        box: centre and radius of the input box.
        shapes: step index (or -1 for the input) -> (B, H, W) of its table.
        errors: step index -> the elementwise rounding bound of the backward step there
            (:mod:`acert.bounds.rounding`) and the (B, H, W) of its table.
        sums: node -> the same for the sum of coefficients where several steps read it.
    """

    relaxations: dict[int, tuple[Tensor, ...]]
    box: tuple[Tensor, ...]
    shapes: dict[int, tuple[int, int, int]]
    errors: dict[int, tuple[Tensor, tuple[int, int, int]]]
    sums: dict[int, tuple[Tensor, tuple[int, int, int]]]


def supports(steps: Sequence[WalkStep], shape: Sequence[int]) -> bool:
    """True when the output (C, H, W) of ``steps`` can be bounded on patches."""
    return len(shape) == 3 and all(
        step.kind.patches is not None
        and (step.kind.on_patches is None or step.kind.on_patches(step.layer))
        for step in steps
    )


def _window_elements(net: Network, end: int, shape: Sequence[int]) -> int:
    """Largest number of coefficients of one specification row on the way back from
    the output of step ``end - 1`` (shape (C, H, W)) to the input; a node read by several
    steps takes the largest window any of them gives it."""
    sizes: dict[int, list[int]] = {end - 1: [1, 1]}
    widest = shape[0]
    for step in reversed(net.steps[:end]):
        size = sizes.pop(step.index, None)
        if size is None:
            continue
        if step.kind.window is not None:
            geometry = step.kind.window(step.layer)
            channels, *extents = net.input_shapes[step.index]
            grown = [
                (n - 1) * stride + dilation * (kernel - 1) + 1
                for n, stride, dilation, kernel in zip(
                    size, geometry.stride, geometry.dilation, geometry.kernel, strict=True
                )
            ]
            widest = max(widest, channels * grown[0] * grown[1])
            size = [min(n, extent) for n, extent in zip(grown, extents, strict=True)]
        for i in step.inputs:
            sizes[i] = [max(a, b) for a, b in zip(sizes.get(i, size), size, strict=True)]
    return widest


def _pixel_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The (B, C, H, W) tensors as contiguous (B·H·W, C) tables."""
    return tuple(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).contiguous() for t in tensors)


def _tables(net: Network, end: int) -> _Tables:
    """The gather tables of the relaxed steps in ``steps[:end]`` and of the input box."""
    relaxations, shapes = {}, {}
    for step in net.steps[:end]:
        relaxer = step.kind.relaxer
        if relaxer is not None and relaxer.table is not None:
            table = relaxer.table(net.relaxations[step.index])
            relaxations[step.index] = _pixel_rows(*table)
            batch, _, height, width = table[0].shape
            shapes[step.index] = (batch, height, width)
    batch, _, height, width = net.box.centre.shape
    shapes[-1] = (batch, height, width)
    errors = {}
    for index, step_error in net.errors.items():
        if index < end:
            batch, _, height, width = step_error.elementwise.shape
            errors[index] = (_pixel_rows(step_error.elementwise)[0], (batch, height, width))
    sums = {}
    for index, step_error in net.sums.items():
        if index < end:
            batch, _, height, width = step_error.elementwise.shape
            sums[index] = (_pixel_rows(step_error.elementwise)[0], (batch, height, width))
    box = _pixel_rows(net.box.centre, net.box.radius)
    return _Tables(relaxations, box, shapes, errors, sums)


def _input_bound(windows: Windows, bias: Tensor, bias_magnitude: Tensor, tables: _Tables) -> Tensor:
    """(Q, S) minimum over the input box, less the rounding allowance, as in the dense pass."""
    centre, radius = gather(tables.box, tables.shapes[-1], windows)
    terms = tables.box[0].shape[1] * math.prod(tables.shapes[-1][1:])  # the dense pass's
    return input_lower_bound(
        windows.coeffs, bias, bias_magnitude, centre, radius, window_dot, terms
    )


def lower_bound(
    net: Network, end: int, windows: Windows, bias: Tensor, tables: _Tables | None = None
) -> Tensor:
    """Minimum over the input box of the windowed functions of the output of ``steps[:end]``.

    Args:
        net: the prepared network; ``steps[:end]`` must satisfy :func:`supports`.
        end: number of leading steps the functions sit on.
        windows: the functions, on windows of that output.
        bias: (Q, S) constants.
        tables: the gather tables of ``net`` (built when not given).

    Returns:
        (Q, S) lower bounds.
    """
    tables = _tables(net, end) if tables is None else tables
    bias_magnitude = bias.abs()  # Σ|each step's contribution|, as in the dense pass
    error = torch.zeros_like(bias)  # the rounding of every step, as in the dense pass
    pending = Pending(end - 1, windows)
    for step in reversed(net.steps[:end]):
        index, previous = step.index, bias
        shape = net.shapes[index]
        taken, _ = pending.take(index, lambda a, b, shape=shape: add_windows(a, b, shape))
        if taken is None:
            continue  # no step on the way back reads it
        windows = taken
        error = _charge(error, windows, tables.sums.get(index), net.sums.get(index))
        error = _charge(error, windows, tables.errors.get(index), net.errors.get(index))
        relaxation = None
        if index in tables.relaxations:
            relaxation = tuple(gather(tables.relaxations[index], tables.shapes[index], windows))
        inputs = net.step_input_shapes(step)
        ctx = PatchContext(net.stats, net.input_shapes[index], relaxation, inputs)
        given, bias = step.kind.patches(step, windows, bias, ctx)
        for i, w in zip(step.inputs, given if isinstance(given, tuple) else (given,), strict=True):
            pending.add(i, w)
        bias_magnitude = bias_magnitude + (bias - previous).abs()
    shape = net.shape_of(INPUT)
    taken, _ = pending.take(INPUT, lambda a, b: add_windows(a, b, shape))
    assert taken is not None
    error = _charge(error, taken, tables.sums.get(INPUT), net.sums.get(INPUT))
    return _input_bound(taken, bias, bias_magnitude, tables) - error


def _charge(
    error: Tensor,
    windows: Windows,
    table: tuple[Tensor, tuple[int, int, int]] | None,
    step_error: StepError | None,
) -> Tensor:
    """``error`` plus a rounding bound (:class:`StepError`) gathered on the windows."""
    if table is None or step_error is None:
        return error
    elementwise = gather([table[0]], table[1], windows)[0]
    absolute = step_error.absolute[windows.rows]
    return error + window_dot(windows.coeffs.abs(), elementwise) + absolute[:, None]


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


def preactivation_bounds(
    net: Network, end: int, ibp_bounds: Interval, undecided: Tensor, budget: int
) -> Interval:
    """CROWN bounds of the (B, C, H, W) output of ``steps[:end]`` for its ``undecided``
    neurons, intersected with IBP.

    The neurons of all samples are processed together, in chunks whose coefficient tensors
    (two specification rows per neuron, on the largest window of the way back) stay under
    ``budget`` elements (and ``CPU_CHUNK_ELEMENTS`` on the CPU).
    """
    lower, upper = ibp_bounds.lower.flatten(1).clone(), ibp_bounds.upper.flatten(1).clone()
    rows, neurons = torch.nonzero(undecided.flatten(1), as_tuple=True)
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
