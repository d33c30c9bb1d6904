"""Interval bound propagation (Gowal et al. 2019) in centre/radius form.

Each step of the walk over the model (:func:`acert.bounds.kinds.walk`) makes its interval map
once with its kind's rule (``LayerKind.interval``); a :class:`Program` runs them in topological
order, each step's interval kept while a later step still reads it. The margin specification
is folded into the last linear layer before the interval is applied (docs/METHOD.md, "Threat
model and certificates").

Rounding: the intervals contain what the network computes in exact arithmetic and in its float
forward pass, not only what the bound's own float arithmetic happens to give: every rule widens
its output by a bound on those rounding errors when ``sound`` (the affine kinds:
:mod:`acert.bounds.affine`), and the folded last layer subtracts
:func:`acert.bounds.allowances.rounding_allowance` of the terms of both logits it compares
(``|W_y| + |W_t|``, which cannot cancel). Active ReLUs pass (c, r) on exactly. Where the
model's own sums may overflow, a sound map gives the sample an infinite radius and its margins
are -inf (:mod:`acert.bounds.overflow`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from acert.bounds.affine import fan_in
from acert.bounds.allowances import rounding_allowance
from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import BoxMap, LayerKind, WalkStep
from acert.bounds.kinds import LAYER_KINDS, walk
from acert.bounds.overflow import limit, uncertified_unless_finite
from acert.bounds.spec import folded_margin_layer, margin_matrix
from acert.models.graph import INPUT

__all__ = [
    "RULES",
    "BoxMap",
    "Program",
    "fan_in",
    "last_layer_margins",
    "prepare",
    "prepare_head",
    "program",
    "propagate",
]

Rule = Callable[[nn.Module, "BatchStats | None", bool], BoxMap]
"""``rule(layer, stats, sound)``: one layer's interval map (see
:data:`acert.bounds.kind_rules.IntervalRule`)."""


def _layer_rule(kind: LayerKind) -> Rule:
    def rule(layer: nn.Module, stats: BatchStats | None, sound: bool = True) -> BoxMap:
        return kind.interval(WalkStep(0, layer, kind), stats, sound)

    return rule


class _Rules(Mapping[type[nn.Module], Rule]):
    """A view of the table's single-input kinds (registered ones included) as rules."""

    def __getitem__(self, layer_type: type[nn.Module]) -> Rule:
        kind = next((k for k in LAYER_KINDS if k.type is layer_type and k.arity == 1), None)
        if kind is None:
            raise KeyError(layer_type)
        return _layer_rule(kind)

    def __iter__(self) -> Iterator[type[nn.Module]]:
        return iter([kind.type for kind in LAYER_KINDS if kind.arity == 1])

    def __len__(self) -> int:
        return sum(kind.arity == 1 for kind in LAYER_KINDS)


RULES: Mapping[type[nn.Module], Rule] = _Rules()
"""The interval rule of one layer on its own, by type: a view of the table
(:data:`acert.bounds.kinds.LAYER_KINDS`) for callers that bound a single layer."""

Refine = Callable[[WalkStep, Interval], Interval]
Observe = Callable[[WalkStep, Interval, Interval], None]


@dataclass(frozen=True)
class Program:
    """The interval maps of a model's walk, prepared once for many boxes (a radius search
    evaluates the same network on many radii): batch-norm folded, ``|W|`` computed, for one
    set of batch statistics and one ``sound`` setting.

    Attributes:
        steps: the walk over the layers.
        maps: one interval map per step.
        activation_inputs: the indices of the activation steps (``LayerKind.activation``),
            whose input intervals the warm-up regularisers read.
    """

    steps: tuple[WalkStep, ...]
    maps: tuple[BoxMap, ...]
    activation_inputs: frozenset[int]

    def __call__(self, box: Interval) -> tuple[Interval, list[Interval]]:
        """The output interval of ``box`` and the input interval of every activation, in
        order."""
        return self.run(box)

    def run(
        self,
        box: Interval,
        end: int | None = None,
        refine: Refine | None = None,
        observe: Observe | None = None,
    ) -> tuple[Interval, list[Interval]]:
        """:meth:`__call__` through the first ``end`` steps (all by default); with ``end``,
        the interval returned is that of the (first) input of step ``end``.

        Args:
            refine: ``refine(step, box)``: a tighter interval of the input of each step with
                a relaxation (CROWN's intermediate bounds), which the map then takes.
            observe: ``observe(step, input, output)`` after every step (its first input's
                interval).
        """
        steps = self.steps if end is None else self.steps[:end]
        last_read = {i: step.index for step in steps for i in step.inputs}
        if end is not None and end < len(self.steps):
            last_read[self.steps[end].inputs[0]] = end
        values: dict[int, Interval] = {INPUT: box}
        preactivations: list[Interval] = []
        out = box
        for step, box_map in zip(steps, self.maps, strict=False):
            ins = [values[i] for i in step.inputs]
            if refine is not None and step.kind.relaxer is not None:
                ins[0] = refine(step, ins[0])
            if step.index in self.activation_inputs:
                preactivations.append(ins[0])
            out = box_map(*ins)
            if observe is not None:
                observe(step, ins[0], out)
            values[step.index] = out
            for i in step.inputs:  # keep an interval only while a later step reads it
                if last_read[i] == step.index:
                    values.pop(i, None)
        if end is not None and end < len(self.steps):
            out = values[self.steps[end].inputs[0]]
        return out, preactivations


def program(
    steps: Sequence[WalkStep], stats: BatchStats | None = None, sound: bool = True
) -> Program:
    """The :class:`Program` of a walk's steps (see :func:`prepare`)."""
    maps = tuple(step.kind.interval(step, stats, sound) for step in steps)
    activations = frozenset(step.index for step in steps if step.kind.activation)
    return Program(tuple(steps), maps, activations)


def prepare(
    model: nn.Module | Iterable[nn.Module], stats: BatchStats | None = None, sound: bool = True
) -> Program:
    """The :class:`Program` of a model's walk (a chain of layers or a
    :class:`acert.models.GraphNet`); each linear/conv layer followed by a batch-norm is one
    affine map (:func:`acert.bounds.channels.fold_batchnorm`).

    Args:
        model: supported modules (:data:`acert.bounds.kinds.LAYER_KINDS`).
        stats: clean-batch statistics for train-mode batch-norms.
        sound: widen every interval for rounding (see :data:`acert.bounds.kind_rules.IntervalRule`).
    """
    return program(walk(model), stats, sound)


def prepare_head(
    model: nn.Module, stats: BatchStats | None = None, sound: bool = True
) -> tuple[Callable[[Interval], tuple[Interval, list[Interval]]], nn.Linear]:
    """The interval map of a model up to its last layer (an ``nn.Linear``, into which the
    margin specification is folded: :func:`last_layer_margins`) and that layer.

    Returns:
        ``head(box) -> (interval of the last layer's input, activation inputs)``, and the
        last layer.
    """
    prepared = prepare(model, stats, sound)
    last = prepared.steps[-1]
    assert isinstance(last.layer, nn.Linear) and last.norm is None
    end = len(prepared.steps) - 1
    return (lambda box: prepared.run(box, end=end)), last.layer


def propagate(
    layers: nn.Module | Iterable[nn.Module],
    box: Interval,
    stats: BatchStats | None = None,
    sound: bool = True,
) -> tuple[Interval, list[Interval]]:
    """Push an input box through ``layers``.

    Args:
        layers: supported modules (:data:`acert.bounds.kinds.LAYER_KINDS`).
        box: interval of the first layer's input.
        stats: clean-batch statistics for train-mode batch-norms.
        sound: widen every interval for rounding (see :data:`acert.bounds.kind_rules.IntervalRule`).

    Returns:
        the output interval and the input interval of every activation, in order.
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
        sound: subtract the rounding allowance of
        :func:`acert.bounds.allowances.rounding_allowance`.

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
