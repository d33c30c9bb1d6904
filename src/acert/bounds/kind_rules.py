"""The types of the layer-kind table (:mod:`acert.bounds.kinds`): a step of the walk over a
model, the rules a layer kind gives each bound method, and what those rules receive.

docs/ARCHITECTURE.md, "Layer kinds", shows what adding a kind takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval

__all__ = [
    "BackwardContext",
    "BackwardRule",
    "BoxMap",
    "Geometry",
    "IntervalRule",
    "LayerKind",
    "PatchContext",
    "PatchRule",
    "Relaxer",
    "RoundingRule",
    "StepError",
    "WalkStep",
    "dense_dot",
    "same_shape",
]

BoxMap = Callable[..., Interval]
"""The interval of a step's output from the intervals of its inputs, in the step's order."""


def same_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape rule of a kind whose output has its input's shape."""
    return shape


def dense_dot(A: Tensor, v: Tensor) -> Tensor:
    """(Q, S) ``Σ A[q, s, ...] · v[q, ...]`` as a batched matrix product (no full-size temporary).

    Args:
        A: (Q, S, *shape) coefficients.
        v: (Q, *shape) one vector per query.
    """
    return torch.bmm(A.flatten(2), v.flatten(1).unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class StepError:
    """The rounding bound of one backward step: ``Σ |A|·elementwise + absolute``
    (:mod:`acert.bounds.rounding`).

    Attributes:
        elementwise: (B, *output shape of the step).
        absolute: (B,).
    """

    elementwise: Tensor
    absolute: Tensor

    def rows(self, rows: Tensor) -> StepError:
        """The bounds of the given batch rows (one per query)."""
        return StepError(self.elementwise[rows], self.absolute[rows])

    def cost(self, A: Tensor, dot: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """(Q, S) the bound for coefficients A (Q, S, ...) on this step's output, one batch
        row per query (see :meth:`rows`), ``dot`` the products of their layout."""
        return dot(A.abs(), self.elementwise) + self.absolute.unsqueeze(1)


@dataclass(frozen=True)
class Geometry:
    """How a spatial map (convolution, pooling) reaches into its input: a window of n output
    positions at origin o needs ``(n - 1)·stride + dilation·(kernel - 1) + 1`` input positions
    from ``stride·o - padding`` (:mod:`acert.bounds.patches`). Each a (height, width) pair."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


@dataclass
class BackwardContext:
    """What a dense backward rule needs besides the coefficients.

    Attributes:
        rows: (Q,) the batch row of each query.
        stats: clean-batch statistics of train-mode batch-norms.
        input_shape: the step's input shape, without the batch.
        relaxation: the step's relaxation (kinds with a :class:`Relaxer`), for all B rows.
        input_shapes: the shapes of all its inputs (a kind of several inputs).
    """

    rows: Tensor
    stats: BatchStats | None
    input_shape: tuple[int, ...]
    relaxation: Any = None
    input_shapes: tuple[tuple[int, ...], ...] = ()


@dataclass
class PatchContext:
    """What a patch rule needs besides the windowed coefficients.

    Attributes:
        stats: clean-batch statistics of train-mode batch-norms.
        input_shape: the step's input shape (C, H, W).
        relaxation: the step's :attr:`Relaxer.table` gathered on the windows, each (Q, h, w, C).
        input_shapes: the shapes of all its inputs (a kind of several inputs).
    """

    stats: BatchStats | None
    input_shape: tuple[int, ...]
    relaxation: tuple[Tensor, ...] | None = None
    input_shapes: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Relaxer:
    """How CROWN relaxes a nonlinear kind (ReLU, MaxPool2d) from bounds on its input.

    Attributes:
        relax: ``(layer, pre) -> relaxation`` from the input interval ``pre`` (B, ...); the
            backward rule reads it from :attr:`BackwardContext.relaxation`.
        undecided: ``(layer, pre) -> (B, ...) bool``: the input neurons whose tighter bounds
            can tighten the relaxation (CROWN bounds those by a backward pass of their own).
        rounding: ``(layer, pre, relaxation) -> StepError``: what rounding can cost the
            backward step through the relaxation (:mod:`acert.bounds.rounding`).
        table: ``relaxation -> (B, C, H, W) tensors`` the patch rule gathers on its windows;
            None where the kind has no patch rule.
    """

    relax: Callable[[nn.Module, Interval], Any]
    undecided: Callable[[nn.Module, Interval], Tensor]
    rounding: Callable[[nn.Module, Interval, Any], StepError]
    table: Callable[[Any], tuple[Tensor, ...]] | None = None


IntervalRule = Callable[["WalkStep", "BatchStats | None", bool], BoxMap]
"""``rule(step, stats, sound)``: the step's interval map, its parameters (folded batch-norm,
``|W|``) computed once; ``sound`` widens it for the rounding of the model's and the bound's
arithmetic (certificates), False keeps the plain interval (training objectives, whose value at
tiny ε the widening would swamp). A map carries gradients to the parameters when made with
autograd on."""
BackwardRule = Callable[["WalkStep", Tensor, Tensor, BackwardContext], tuple[Tensor, Tensor]]
"""``rule(step, A, bias, ctx) -> (A', bias')``: a lower bound ``A·h_out + bias`` rewritten as
``A'·h_in + bias'`` (A: (Q, S, *output shape), bias: (Q, S)); a kind of several inputs gives
A' as a tuple, one tensor per input."""
PatchRule = Callable[["WalkStep", Any, Tensor, PatchContext], tuple[Any, Tensor]]
"""``rule(step, windows, bias, ctx) -> (windows', bias')``: the backward rule on
:class:`acert.bounds.windows.Windows`."""
RoundingRule = Callable[["WalkStep", "BatchStats | None", Interval, Interval], "StepError | None"]
"""``rule(step, stats, before, after)``: what rounding can cost the backward step through it,
from the sound IBP intervals of its (first) input and of its output; None where it is
exact."""
CheckRule = Callable[[nn.Module], "str | None"]
"""``check(layer)``: why the module cannot be bounded, or None."""


@dataclass(frozen=True)
class LayerKind:
    """One entry of the layer-kind table: everything the bound engine knows about a type.

    Attributes:
        type: the module class, matched exactly (a subclass may compute something else).
        shape: ``(layer, *input shapes) -> output shape``, shapes without the batch; raises
            :class:`acert.foundation.errors.AcertError` (a sentence the walk prefixes with
            the layer's name) for inputs it cannot take.
        interval: IBP (:data:`IntervalRule`).
        backward: CROWN's dense backward rule (:data:`BackwardRule`).
        patches: CROWN's rule on windows (:data:`PatchRule`); None: the neurons after the
            kind take the dense pass.
        rounding: :data:`RoundingRule`; None where the backward step is exact (Flatten) or a
            :class:`Relaxer` bounds it.
        relaxer: for a nonlinear kind, how CROWN relaxes it.
        example: ``() -> (module, input shape)``: a small instance with random parameters
            and the shape (without the batch) of an input it takes, for the tests every kind
            gets (tests/bounds/test_kinds.py); for a kind of several inputs the module is a
            small :class:`acert.models.GraphNet` around it, of one input of that shape.
        check: why a module of the type cannot be bounded (a padding mode, ...), or None.
        certify_check: why no input's prediction can be certified with the module in its
            current mode (a batch-norm that normalises with the current batch, Dropout in
            train mode), or None; training objectives with clean-batch statistics skip it.
        input_rank: dims (with the batch) the input must have, None for any.
        exactness: ``"elementwise"`` (a diagonal map or a reshape), ``"affine"`` (any other
            affine map) or ``"relaxed"`` (IBP is not exact through it: a nonlinearity, or a
            sum of correlated inputs): IBP is exact on a chain of elementwise kinds with at
            most one affine one, and CROWN then needs no bounds of its own.
        folds_batchnorm: a batch-norm right after it becomes part of its step.
        aliases: its output may be its input tensor itself or a view of it (Identity,
            Dropout, Flatten), so an in-place layer after it writes its input too.
        window: the :class:`Geometry` of a spatial map, for the patch windows.
        arity: how many inputs the kind takes (Add's: 2; None for any number);
            its interval map then takes one interval per input, its shape rule one shape
            per input, and its backward and patch rules return one coefficient tensor (or
            :class:`~acert.bounds.windows.Windows`) per input, as a tuple.
        activation: an elementwise nonlinearity whose input intervals the warm-up
            regularisers read (:attr:`acert.bounds.ibp.Program.activation_inputs`), and
            whose output autograd keeps (an in-place layer after it is refused).
        on_patches: ``layer -> bool``: whether the patch rule applies to the module (None:
            always); where not, the neurons after it take the dense pass.
        evaluate: ``(step, *inputs) -> output``: the step's function on tensors where it is
            not ``step.layer(*inputs)`` (a residual block's Add step); see :meth:`run`.
    """

    type: type[nn.Module]
    shape: Callable[..., tuple[int, ...]]
    interval: IntervalRule
    backward: BackwardRule
    patches: PatchRule | None
    rounding: RoundingRule | None
    example: Callable[[], tuple[nn.Module, tuple[int, ...]]]
    relaxer: Relaxer | None = None
    check: CheckRule | None = None
    certify_check: CheckRule | None = None
    input_rank: int | None = None
    exactness: Literal["elementwise", "affine", "relaxed"] = "elementwise"
    folds_batchnorm: bool = False
    aliases: bool = False
    window: Callable[[nn.Module], Geometry] | None = None
    arity: int | None = 1
    activation: bool = False
    evaluate: Callable[..., Tensor] | None = None
    on_patches: Callable[[nn.Module], bool] | None = None

    def run(self, step: WalkStep, *inputs: Tensor) -> Tensor:
        """The step's output on tensors (without its folded batch-norm)."""
        if self.evaluate is not None:
            return self.evaluate(step, *inputs)
        return step.layer(*inputs)

    @property
    def name(self) -> str:
        return self.type.__name__


@dataclass(frozen=True)
class WalkStep:
    """One step of the walk over a model (:func:`acert.bounds.kinds.walk`): a node of the
    model's graph, in topological order.

    Attributes:
        index: position in the walk: steps, not modules (a folded batch-norm shares its
            layer's step; a residual block is its body's steps and an Add step).
        layer: the module (the Add step of a residual block: the block).
        kind: the table's entry the step runs (for a residual block's Add step: ``Add``'s).
        norm: a batch-norm folded into ``layer``: the step is ``norm(layer(h))``.
        where: the module's name in the model (``model.named_modules()``): ``"3"``, or
            ``"5.body.2"`` for layer 2 of the body of layer 5.
        inputs: the steps whose outputs the step reads, in order; -1 is the model's input.
        norm_where: the name of the folded batch-norm.
    """

    index: int
    layer: nn.Module
    kind: LayerKind
    norm: nn.Module | None = None
    where: str = ""
    inputs: tuple[int, ...] = (-1,)
    norm_where: str = ""
