"""The kinds that bring branches of a graph together: ``Add`` (:class:`acert.models.Add`, also
the sum ``x + body(x)`` a residual block becomes in the walk) and ``Concat``
(:class:`acert.models.Concat`).

Add: IBP adds the intervals of its inputs. They may be correlated (``body(x)`` is a function
of x), so the sum is wider than the exact range, but it contains it: sound. CROWN passes the
coefficients on to both inputs unchanged (where branches meet again, the walk's engines add
them up). Rounding: the model's addition is off by at most ``u·|a + b|`` (the step's), and the
sum of the coefficient tensors where the branches meet by ``γ_k·|h|`` (the engines charge it:
:func:`acert.bounds.rounding.step_errors`).

Concat: the intervals side by side; CROWN splits the coefficients among the inputs. Exact.
"""

from __future__ import annotations

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
    StepError,
    WalkStep,
)
from acert.bounds.normalisation import random_batchnorm
from acert.bounds.overflow import guard
from acert.bounds.windows import Windows
from acert.foundation.errors import AcertError
from acert.models import Add, Concat
from acert.models.graph import INPUT, GraphNet

__all__ = ["ADD", "CONCAT", "addition_error"]


def _add_interval(step: WalkStep, stats: BatchStats | None, sound: bool) -> BoxMap:
    def add(*boxes: Interval) -> Interval:
        centre, radius = boxes[0].centre, boxes[0].radius
        for box in boxes[1:]:
            centre, radius = centre + box.centre, radius + box.radius
        gamma = rounding_gamma(len(boxes), centre.dtype) if sound else 0.0
        if gamma == 0:
            return Interval(centre, radius)
        with torch.no_grad():
            magnitude = boxes[0].centre.abs() + boxes[0].radius
            for box in boxes[1:]:
                magnitude = magnitude + box.centre.abs() + box.radius
            error = gamma * magnitude + underflow_floor(len(boxes), centre.dtype)
            top = magnitude.flatten(1).amax(1)  # the sum's terms (overflow.py)
        return Interval(centre, guard(radius + error, top))

    return add


def addition_error(box: Interval, terms: int = 2) -> StepError:
    """``γ_k·h̄``: a sum of ``terms`` tensors, relative to its result's magnitude h̄."""
    h = torch.maximum(box.lower.abs(), box.upper.abs())
    elementwise = rounding_gamma(terms, h.dtype) * h + underflow_floor(terms, h.dtype)
    return StepError(elementwise, torch.zeros(h.shape[0], dtype=h.dtype, device=h.device))


def _back_add(
    step: WalkStep, A: Tensor, bias: Tensor, ctx: BackwardContext
) -> tuple[tuple[Tensor, ...], Tensor]:
    return (A,) * len(step.inputs), bias


def _patch_add(
    step: WalkStep, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[tuple[Windows, ...], Tensor]:
    return (windows,) * len(step.inputs), bias


def _add_values(step: WalkStep, *inputs: Tensor) -> Tensor:
    total = inputs[0]
    for value in inputs[1:]:
        total = total + value
    return total


def _add_rounding(
    step: WalkStep, stats: BatchStats | None, before: Interval, after: Interval
) -> StepError:
    return addition_error(after)


def _add_shape(layer: nn.Module, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    if any(shape != shapes[0] for shape in shapes):
        raise AcertError(
            f"adds inputs of shapes {' and '.join(map(str, shapes))}; an addition needs "
            "inputs of one shape (a projection shortcut must map to the branch's shape)"
        )
    return shapes[0]


def _add_example() -> tuple[nn.Module, tuple[int, ...]]:
    """A projection shortcut, ``relu(conv1x1(x) + conv(relu(bn(conv(x)))))``: the last ReLU's
    CROWN bounds go back through the addition (on patches too)."""
    nodes = [
        ("conv1", nn.Conv2d(2, 2, 3, padding=1), (INPUT,)),
        ("bn1", random_batchnorm(nn.BatchNorm2d(2)), (0,)),
        ("relu", nn.ReLU(), (1,)),
        ("conv2", nn.Conv2d(2, 3, 3, padding=1), (2,)),
        ("shortcut", nn.Conv2d(2, 3, 1), (INPUT,)),
        ("add", Add(), (4, 3)),
        ("out", nn.ReLU(), (5,)),
    ]
    return GraphNet(nodes), (2, 4, 4)


ADD = LayerKind(
    type=Add,
    shape=_add_shape,
    interval=_add_interval,
    backward=_back_add,
    patches=_patch_add,
    rounding=_add_rounding,
    example=_add_example,
    exactness="relaxed",  # IBP adds correlated intervals: not exact
    arity=2,
    evaluate=_add_values,
)


def _concat_interval(step: WalkStep, stats: BatchStats | None, sound: bool) -> BoxMap:
    dim = step.layer.dim
    return lambda *boxes: Interval(
        torch.cat([box.centre for box in boxes], dim), torch.cat([box.radius for box in boxes], dim)
    )


def _sizes(step: WalkStep, shapes: tuple[tuple[int, ...], ...]) -> list[int]:
    return [shape[step.layer.dim - 1] for shape in shapes]


def _back_concat(
    step: WalkStep, A: Tensor, bias: Tensor, ctx: BackwardContext
) -> tuple[tuple[Tensor, ...], Tensor]:
    # A is (Q, S, *shape): the layer's dim d (batch 0) is A's dim d + 1
    return A.split(_sizes(step, ctx.input_shapes), step.layer.dim + 1), bias


def _patch_concat(
    step: WalkStep, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[tuple[Windows, ...], Tensor]:
    # channels last, (Q, S, h, w, C): only a concatenation of channels keeps the windows
    parts = windows.coeffs.split(_sizes(step, ctx.input_shapes), -1)
    return tuple(Windows(p.contiguous(), windows.origin, windows.rows) for p in parts), bias


def _concat_shape(layer: nn.Module, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    axis = layer.dim - 1
    rest = {shape[:axis] + shape[axis + 1 :] for shape in shapes}
    if axis >= min(len(shape) for shape in shapes) or len(rest) != 1:
        raise AcertError(
            f"joins inputs of shapes {' and '.join(map(str, shapes))} along dim {layer.dim}; "
            "they must have one rank and equal sizes but along that dim"
        )
    out = list(shapes[0])
    out[axis] = sum(shape[axis] for shape in shapes)
    return tuple(out)


def _concat_example() -> tuple[nn.Module, tuple[int, ...]]:
    """Two branches of a (2, 4, 4) input, joined along the channels (Inception-like), then a
    ReLU whose CROWN bounds go back through the concatenation (on patches too)."""
    nodes = [
        ("conv", nn.Conv2d(2, 2, 3, padding=1), (INPUT,)),
        ("bn", random_batchnorm(nn.BatchNorm2d(2)), (0,)),
        ("relu", nn.ReLU(), (1,)),
        ("branch", nn.Conv2d(2, 1, 1), (INPUT,)),
        ("cat", Concat(1), (2, 3)),
        ("out", nn.ReLU(), (4,)),
    ]
    return GraphNet(nodes), (2, 4, 4)


def _check_concat(layer: nn.Module) -> str | None:
    dim = layer.dim
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        return f"joins along dim {dim!r}; the bounds take a dimension after the batch (an int >= 1)"
    return None


CONCAT = LayerKind(
    type=Concat,
    shape=_concat_shape,
    interval=_concat_interval,
    backward=_back_concat,
    patches=_patch_concat,
    rounding=None,
    example=_concat_example,
    arity=None,
    check=_check_concat,
    on_patches=lambda layer: layer.dim == 1,
)
