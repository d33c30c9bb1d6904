"""Interval bound propagation (Gowal et al. 2019) in centre/radius form.

Each step of the walk over the model (:func:`acert.bounds.kinds.walk`) makes its interval map
once with its kind's rule (``LayerKind.interval``); a :class:`Program` runs them in order, the
interval of a residual block's input kept for its join. The margin specification is folded
into the last linear layer before the interval is applied (docs/METHOD.md, "Threat model and
certificates").

Rounding: the intervals contain what the network computes in exact arithmetic and in its float
forward pass, not only what the bound's own float arithmetic happens to give: every rule widens
its output by a bound on those rounding errors when ``sound`` (the affine kinds:
:mod:`acert.bounds.affine`), and the folded last layer subtracts
:func:`acert.bounds.spec.rounding_allowance` of the terms of both logits it compares
(``|W_y| + |W_t|``, which cannot cancel). Active ReLUs pass (c, r) on exactly. Where the
model's own sums may overflow, a sound map gives the sample an infinite radius and its margins
are -inf (:mod:`acert.bounds.overflow`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor, nn

from acert.bounds.affine import fan_in
from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval
from acert.bounds.kinds import LAYER_KINDS, walk
from acert.bounds.overflow import limit, uncertified_unless_finite
from acert.bounds.spec import folded_margin_layer, margin_matrix, rounding_allowance
from acert.bounds.steps import BoxMap, LayerKind, Step

__all__ = [
    "RULES",
    "BoxMap",
    "Program",
    "fan_in",
    "last_layer_margins",
    "prepare",
    "program",
    "propagate",
]

Rule = Callable[[nn.Module, "BatchStats | None", bool], BoxMap]
"""``rule(layer, stats, sound)``: one layer's interval map (see
:data:`acert.bounds.steps.IntervalRule`)."""


def _layer_rule(kind: LayerKind) -> Rule:
    def rule(layer: nn.Module, stats: BatchStats | None, sound: bool = True) -> BoxMap:
        return kind.interval(Step(0, layer, kind), stats, sound)

    return rule


RULES: Mapping[type[nn.Module], Rule] = MappingProxyType(
    {kind.type: _layer_rule(kind) for kind in LAYER_KINDS if kind.body is None}
)
"""The interval rule of one layer on its own, by type: a view of the table
(:data:`acert.bounds.kinds.LAYER_KINDS`) for callers that bound a single layer."""

Refine = Callable[[Step, Interval], Interval]
Observe = Callable[[Step, Interval, Interval], None]


@dataclass(frozen=True)
class Program:
    """The interval maps of a chain of layers, prepared once for many boxes (a radius search
    evaluates the same network on many radii): batch-norm folded, ``|W|`` computed, for one
    set of batch statistics and one ``sound`` setting.

    Attributes:
        steps: the walk over the layers.
        maps: one interval map per step.
        relu_inputs: the indices of the ReLU steps.
    """

    steps: tuple[Step, ...]
    maps: tuple[BoxMap, ...]
    relu_inputs: frozenset[int]

    def __call__(self, box: Interval) -> tuple[Interval, list[Interval]]:
        """The output interval of ``box`` and the input interval of every ReLU, in order."""
        return self.run(box)

    def run(
        self,
        box: Interval,
        end: int | None = None,
        refine: Refine | None = None,
        observe: Observe | None = None,
    ) -> tuple[Interval, list[Interval]]:
        """:meth:`__call__` through the first ``end`` steps (all by default).

        Args:
            refine: ``refine(step, box)``: a tighter interval of the input of each step with
                a relaxation (CROWN's intermediate bounds), which the map then takes.
            observe: ``observe(step, input, output)`` after every step.
        """
        preactivations: list[Interval] = []
        skips: list[Interval] = []
        for step, box_map in zip(self.steps[:end], self.maps[:end], strict=True):
            if refine is not None and step.kind.relaxer is not None:
                box = refine(step, box)
            if step.index in self.relu_inputs:
                preactivations.append(box)
            if step.role == "join":
                out = box_map(box, skips.pop())
            else:
                if step.role == "fork":
                    skips.append(box)
                out = box_map(box)
            if observe is not None:
                observe(step, box, out)
            box = out
        return box, preactivations


def program(steps: Sequence[Step], stats: BatchStats | None = None, sound: bool = True) -> Program:
    """The :class:`Program` of a walk's steps (see :func:`prepare`)."""
    maps = tuple(step.kind.interval(step, stats, sound) for step in steps)
    relu_inputs = frozenset(step.index for step in steps if step.kind.type is nn.ReLU)
    return Program(tuple(steps), maps, relu_inputs)


def prepare(
    layers: Iterable[nn.Module], stats: BatchStats | None = None, sound: bool = True
) -> Program:
    """The :class:`Program` of ``layers``; each linear/conv layer followed by a batch-norm is one
    affine map (:func:`acert.bounds.channels.fold_batchnorm`).

    Args:
        layers: supported modules (:data:`acert.bounds.kinds.LAYER_KINDS`).
        stats: clean-batch statistics for train-mode batch-norms.
        sound: widen every interval for rounding (see :data:`acert.bounds.steps.IntervalRule`).
    """
    return program(walk(layers), stats, sound)


def propagate(
    layers: Iterable[nn.Module],
    box: Interval,
    stats: BatchStats | None = None,
    sound: bool = True,
) -> tuple[Interval, list[Interval]]:
    """Push an input box through ``layers``.

    Args:
        layers: supported modules (:data:`acert.bounds.kinds.LAYER_KINDS`).
        box: interval of the first layer's input.
        stats: clean-batch statistics for train-mode batch-norms.
        sound: widen every interval for rounding (see :data:`acert.bounds.steps.IntervalRule`).

    Returns:
        the output interval and the input interval of every ReLU, in order.
    """
    return prepare(layers, stats, sound)(box)


def last_layer_margins(layer: nn.Linear, box: Interval, y: Tensor, sound: bool = True) -> Tensor:
    """Lower bounds of ``f_y - f_t`` for t != y with the specification folded into ``layer``.

    Rows ``W_y - W_t`` and biases ``b_y - b_t`` form one linear map per sample, which is then
    applied to the interval of the layer's input.

    Args:
        layer: the last linear layer (K outputs).
        box: (B, D) interval of its input.
        y: (B,) labels.
        sound: subtract the rounding allowance of :func:`acert.bounds.spec.rounding_allowance`.

    Returns:
        (B, K-1) lower bounds, classes t in increasing order with y left out.
    """
    weight, bias = folded_margin_layer(layer, y)
    centre = torch.einsum("bkd,bd->bk", weight, box.centre)
    radius = torch.einsum("bkd,bd->bk", weight.abs(), box.radius)
    if bias is not None:
        centre = centre + bias
    if not sound:
        return centre - radius
    # the model computes z_y and z_t, each rounded relative to its own terms: |W_y| + |W_t|,
    # not |W_y - W_t|, which may cancel
    with torch.no_grad():
        spec = margin_matrix(y, layer.out_features, weight.dtype).abs()
        magnitude = torch.einsum(
            "bkd,bd->bk", spec @ layer.weight.abs(), box.centre.abs() + box.radius
        )
        if bias is not None:
            magnitude = magnitude + spec @ layer.bias.abs()
    # the logits' sums must not overflow either (acert.bounds.overflow)
    margins = centre - radius - rounding_allowance(magnitude, fan_in(layer))
    if magnitude.numel() and float(magnitude.max()) < limit(margins.dtype):  # False for NaN
        return uncertified_unless_finite(margins)
    return uncertified_unless_finite(
        margins.masked_fill(~(magnitude < limit(margins.dtype)), -torch.inf)
    )
