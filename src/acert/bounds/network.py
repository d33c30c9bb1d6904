"""A model prepared for CROWN's backward passes (:mod:`acert.bounds.crown`, the dense pass;
:mod:`acert.bounds.patches`, the pass on receptive-field windows): its steps, their input shapes,
the input box, the relaxations and the rounding bound of each step.

A backward pass visits the steps in reverse topological order, keeping coefficients per node:
where a node's output is read by several steps, their coefficients on it add up (in the order
of those steps) before the node's own step runs, and the rounding of that sum is charged
(:attr:`Network.sums`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from acert.bounds.allowances import input_lower_bound
from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import BackwardContext, WalkStep, dense_dot
from acert.bounds.rounding import StepError
from acert.models.graph import INPUT

__all__ = ["Network", "Pending"]

T = TypeVar("T")


class Pending:
    """The coefficients of a backward pass waiting at each node for the steps that read it:
    ``add(node, c)`` per reading step (visited in reverse order), ``take(node, plus)`` their
    sum in the order of the reading steps, by ``plus``, once all have given theirs."""

    def __init__(self, node: int, coefficients: Any) -> None:
        self._waiting: dict[int, list[Any]] = {node: [coefficients]}

    def add(self, node: int, coefficients: Any) -> None:
        self._waiting.setdefault(node, []).append(coefficients)

    def take(self, node: int, plus: Callable[[T, T], T]) -> tuple[T | None, int]:
        """The summed coefficients on ``node`` (None where no step on the way back reads it)
        and how many contributions they summed."""
        parts = self._waiting.pop(node, None)
        if parts is None:
            return None, 0
        total = parts[-1]  # the earliest reader's first
        for part in reversed(parts[:-1]):
            total = plus(total, part)
        return total, len(parts)


@dataclass
class Network:
    """A model prepared for backward passes: its steps, their input shapes, the relaxations."""

    steps: tuple[WalkStep, ...]
    input_shapes: list[tuple[int, ...]]
    """The shape of each step's first input (no batch)."""
    box: Interval
    stats: BatchStats | None
    relaxations: dict[int, object]
    errors: dict[int, StepError]
    """The rounding bound of each backward step (:mod:`acert.bounds.rounding`); empty for
    the plain arithmetic of a training objective."""
    shapes: list[tuple[int, ...]]
    """The output shape of each step (no batch)."""
    sums: dict[int, StepError]
    """The rounding bound of the sum of coefficients at each node (a step's output, or -1 for
    the model's input) that several steps read; empty for plain arithmetic."""

    def shape_of(self, node: int) -> tuple[int, ...]:
        return tuple(self.box.shape[1:]) if node == INPUT else self.shapes[node]

    def step_input_shapes(self, step: WalkStep) -> tuple[tuple[int, ...], ...]:
        return tuple(self.shape_of(i) for i in step.inputs)

    def lower_bound(
        self, end: int, A: Tensor, bias: Tensor, rows: Tensor, error: Tensor | None = None
    ) -> Tensor:
        """Minimum over the input box of ``A · h + bias``, h the output of step ``end - 1``.

        Args:
            end: one past the step the linear function sits on.
            A: (Q, S, *shape of h) coefficients.
            bias: (Q, S) constants.
            rows: (Q,) batch row of each query.
            error: (Q, S) rounding already incurred in forming A and bias (the last layer's).

        Returns:
            (Q, S) lower bounds, less the rounding of every step and of the input step.
        """
        bias_magnitude = bias.abs()  # Σ|each step's contribution|: they may cancel in the sum
        error = torch.zeros_like(bias) if error is None else error
        pending = Pending(end - 1, A)
        for step in reversed(self.steps[:end]):
            A, _ = pending.take(step.index, torch.add)
            if A is None:
                continue  # no step on the way back reads it
            previous = bias
            if step.index in self.sums:
                error = error + self.sums[step.index].rows(rows).cost(A, dense_dot)
            if step.index in self.errors:
                error = error + self.errors[step.index].rows(rows).cost(A, dense_dot)
            ctx = BackwardContext(
                rows,
                self.stats,
                self.input_shapes[step.index],
                self.relaxations.get(step.index),
                self.step_input_shapes(step),
            )
            A_in, bias = step.kind.backward(step, A, bias, ctx)
            for i, a in zip(step.inputs, A_in if isinstance(A_in, tuple) else (A_in,), strict=True):
                pending.add(i, a)
            bias_magnitude = bias_magnitude + (bias - previous).abs()
        A, _ = pending.take(INPUT, torch.add)
        assert A is not None
        if INPUT in self.sums:
            error = error + self.sums[INPUT].rows(rows).cost(A, dense_dot)
        centre, radius = self.box.centre[rows], self.box.radius[rows]
        terms = centre[0].numel() if centre.numel() else 0
        return input_lower_bound(A, bias, bias_magnitude, centre, radius, dense_dot, terms) - error
