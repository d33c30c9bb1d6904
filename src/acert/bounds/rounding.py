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
  :func:`acert.bounds.allowances.rounding_gamma` for the products summed forwards (fan-in) and
  backwards (fan-out) together; the same with the per-channel scale and shift for Normalize
  and batch-norm; for a ReLU, ``γ·(h̄ + |intercept|)`` of its relaxation's slopes and lines
  and ``γ_n·|intercept|`` of the intercepts summed over the whole layer; plus the underflow floor
  of those sums
  (:func:`acert.bounds.allowances.underflow_floor`) for the forward pass;
- ``absolute`` (one number per sample): the underflow of the products that form ``A'``, which
  no relative bound covers, ``floor(fan-out)·Σ h̄``.

Each kind gives its own bound (``LayerKind.rounding``, or its relaxer's for ReLU and
MaxPool2d): the affine kinds in :mod:`acert.bounds.affine`, average pooling as a convolution of
fan-in kh·kw, an addition in :mod:`acert.bounds.combine`; Flatten, Identity, Dropout and Concat
are exact. Where several steps read a node (a residual block's input), the backward pass sums
their coefficients there: ``γ_k·h̄`` for k of them, charged on the sum. The backward pass adds
these up and subtracts them with the allowance of the input step
(:func:`acert.bounds.allowances.input_lower_bound`). docs/ARCHITECTURE.md, "Soundness",
explains the rounding model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from acert.bounds import ibp
from acert.bounds.activations import relu_step
from acert.bounds.affine import fan_out
from acert.bounds.channels import BatchStats
from acert.bounds.combine import addition_error
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import StepError, WalkStep
from acert.models.graph import INPUT

__all__ = ["StepError", "fan_out", "relu_step", "step_errors"]


def step_errors(
    steps: Sequence[WalkStep], box: Interval, stats: BatchStats | None
) -> tuple[dict[int, StepError], dict[int, StepError]]:
    """The rounding bound of every backward step whose kind has a rounding rule, by step index
    (a ReLU's, or any relaxed kind's, comes with its relaxation: ``Relaxer.rounding``), and of
    the sum of coefficients at every node that k >= 2 steps read (``γ_k·h̄`` of the node's
    output, -1 for the model's input), by node.

    Args:
        steps: the walk over the network's layers.
        box: the input box (B, ...), clipped to the domain.
        stats: clean-batch statistics for train-mode batch-norms.
    """
    errors: dict[int, StepError] = {}
    sums: dict[int, StepError] = {}
    readers = Counter(i for step in steps for i in step.inputs)
    if readers[INPUT] > 1:
        sums[INPUT] = _charge_overflow(addition_error(box, readers[INPUT]), box)

    def observe(step: WalkStep, before: Interval, after: Interval) -> None:
        if step.kind.rounding is not None:
            error = step.kind.rounding(step, stats, before, after)
            if error is not None:
                errors[step.index] = _charge_overflow(error, after)
        if readers[step.index] > 1:
            sums[step.index] = _charge_overflow(addition_error(after, readers[step.index]), after)

    with torch.no_grad():
        ibp.program(steps, stats, True).run(box, observe=observe)
    return errors, sums


def _charge_overflow(error: StepError, after: Interval) -> StepError:
    """An infinite bound for the samples whose sums in this step may overflow (the sound
    interval marks them with an infinite radius: :mod:`acert.bounds.overflow`), so that no
    backward pass through the step certifies them, whatever its coefficients."""
    overflow = ~torch.isfinite(after.radius.flatten(1)).all(1)
    if not bool(overflow.any()):
        return error
    return StepError(error.elementwise, error.absolute.masked_fill(overflow, torch.inf))
