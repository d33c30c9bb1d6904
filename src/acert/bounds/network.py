"""A model prepared for CROWN's backward passes (:mod:`acert.bounds.crown`, the dense pass;
:mod:`acert.bounds.patches`, the pass on receptive-field windows): its steps, their input shapes,
the input box, the relaxations and the rounding bound of each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acert.bounds.allowances import input_lower_bound
from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import BackwardContext, WalkStep, dense_dot
from acert.bounds.rounding import StepError

__all__ = ["Network"]


@dataclass
class Network:
    """A model prepared for backward passes: its steps, their input shapes, the relaxations."""

    steps: tuple[WalkStep, ...]
    input_shapes: list[tuple[int, ...]]
    box: Interval
    stats: BatchStats | None
    relaxations: dict[int, object]
    errors: dict[int, StepError]
    """The rounding bound of each backward step (:mod:`acert.bounds.rounding`); empty for
    the plain arithmetic of a training objective."""

    def lower_bound(
        self, end: int, A: Tensor, bias: Tensor, rows: Tensor, error: Tensor | None = None
    ) -> Tensor:
        """Minimum over the input box of ``A · h + bias``, h the output of ``steps[:end]``.

        Args:
            end: number of leading steps the linear function sits on.
            A: (Q, S, *shape of h) coefficients.
            bias: (Q, S) constants.
            rows: (Q,) batch row of each query.
            error: (Q, S) rounding already incurred in forming A and bias (the last layer's).

        Returns:
            (Q, S) lower bounds, less the rounding of every step and of the input step.
        """
        bias_magnitude = bias.abs()  # Σ|each step's contribution|: they may cancel in the sum
        error = torch.zeros_like(bias) if error is None else error
        skips: list[tuple[int, Tensor]] = []  # (fork, coefficients on the skip) per open join
        for step in reversed(self.steps[:end]):
            previous = bias
            if step.role == "fork" and skips and skips[-1][0] == step.index:
                A = A + skips.pop()[1]
            if step.index in self.errors:
                error = error + self.errors[step.index].rows(rows).cost(A, dense_dot)
            ctx = BackwardContext(
                rows, self.stats, self.input_shapes[step.index], self.relaxations.get(step.index)
            )
            A, bias = step.kind.backward(step, A, bias, ctx)
            if step.role == "join":
                skips.append((step.partner, A))
            bias_magnitude = bias_magnitude + (bias - previous).abs()
        centre, radius = self.box.centre[rows], self.box.radius[rows]
        terms = centre[0].numel() if centre.numel() else 0
        return input_lower_bound(A, bias, bias_magnitude, centre, radius, dense_dot, terms) - error
