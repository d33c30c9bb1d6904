"""The residual block ``x + body(x)`` (:class:`acert.models.Residual`) as two steps of the
walk around its body's: a fork, where x goes to both branches, and a join, where they add up.

IBP adds the intervals of x and body(x). They are correlated (body(x) is a function of x), so
the sum is wider than the exact range, but it contains it: sound. CROWN pushes a bound
``A·(x + body(x))`` back along both branches, A on the skip and A through the body, and adds the
two coefficient tensors where they meet again at x (the engines keep the skip's coefficients
on a stack from join to fork). Rounding: the model's addition is off by at most ``u·|x + body(x)|``
(the join's step) and the sum of the two coefficient tensors by ``u·|A_skip + A_body|`` (the
fork's step, charged on the summed coefficients).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval
from acert.bounds.normalisation import random_batchnorm
from acert.bounds.overflow import guard
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
from acert.models import Residual

__all__ = ["FORK", "RESIDUAL"]


def _join_interval(step: Step, stats: BatchStats | None, sound: bool) -> BoxMap:
    def join(body: Interval, skip: Interval) -> Interval:
        centre, radius = skip.centre + body.centre, skip.radius + body.radius
        gamma = rounding_gamma(2, centre.dtype) if sound else 0.0
        if gamma == 0:
            return Interval(centre, radius)
        with torch.no_grad():
            magnitude = skip.centre.abs() + skip.radius + body.centre.abs() + body.radius
            error = gamma * magnitude + underflow_floor(2, centre.dtype)
            top = magnitude.flatten(1).amax(1)  # the sum's terms (overflow.py)
        return Interval(centre, guard(radius + error, top))

    return join


def _pass_interval(step: Step, stats: BatchStats | None, sound: bool) -> BoxMap:
    return lambda box: box


def _back_pass(step: Step, A: Tensor, bias: Tensor, ctx: BackwardContext) -> tuple[Tensor, Tensor]:
    return A, bias


def _patch_pass(
    step: Step, windows: Windows, bias: Tensor, ctx: PatchContext
) -> tuple[Windows, Tensor]:
    return windows, bias


def _addition_error(box: Interval) -> StepError:
    """``γ₂·h̄``: one addition per element, relative to its result's magnitude h̄."""
    h = torch.maximum(box.lower.abs(), box.upper.abs())
    elementwise = rounding_gamma(2, h.dtype) * h + underflow_floor(2, h.dtype)
    return StepError(elementwise, torch.zeros(h.shape[0], dtype=h.dtype, device=h.device))


def _join_rounding(
    step: Step, stats: BatchStats | None, before: Interval, after: Interval
) -> StepError:
    return _addition_error(after)


def _fork_rounding(
    step: Step, stats: BatchStats | None, before: Interval, after: Interval
) -> StepError:
    return _addition_error(before)


def _check_body(layer: nn.Module) -> str | None:
    body = layer.body
    if type(body) is not nn.Sequential or len(body) == 0:
        return (
            f"has a body of type {type(body).__name__} with {len(list(body.children()))} "
            "modules; the bounds follow a non-empty nn.Sequential of supported layers"
        )
    return None


def _example() -> tuple[nn.Module, tuple[int, ...]]:
    body = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1),
        random_batchnorm(nn.BatchNorm2d(2)),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1),
    )
    return Residual(body), (2, 4, 4)


FORK = LayerKind(
    type=Residual,
    shape=same_shape,
    interval=_pass_interval,
    backward=_back_pass,
    patches=_patch_pass,
    rounding=_fork_rounding,
    example=_example,
    role="fork",
)
RESIDUAL = LayerKind(
    type=Residual,
    shape=same_shape,
    interval=_join_interval,
    backward=_back_pass,
    patches=_patch_pass,
    rounding=_join_rounding,
    example=_example,
    check=_check_body,
    exactness="relaxed",
    body="body",
    fork=FORK,
    role="join",
)
