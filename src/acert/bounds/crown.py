"""Backward linear relaxation: CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al. 2020).

A lower bound of a linear function ``A · h_k + bias`` of some step's output is pushed back
step by step to the input along the walk over the model (:func:`acert.bounds.kinds.walk`),
each step by its kind's backward rule (``LayerKind.backward``). A nonlinear kind (ReLU,
MaxPool2d) is relaxed by linear bounds from bounds on its input (``LayerKind.relaxer``; ReLU's
adaptive rule of docs/METHOD.md "Threat model and certificates"). The pass visits the steps in
reverse topological order and keeps coefficients per node: where several steps read a node
(the branches of a residual block meeting at its input), their coefficients add up there
(:class:`acert.bounds.network.Network`). At the input the linear function is minimised over the
clipped box in closed form.

CROWN bounds the input of every relaxed step with the same backward pass, for the neurons
whose bounds can tighten its relaxation (intersected with IBP, which is sound and never
looser); CROWN-IBP takes the intermediate bounds from IBP and runs the backward pass only from
the output.

Backward state has shape (Q, S, *layer shape): Q queries, each tied to one batch row by
``rows`` (Q,), S specification rows per query. Queries are processed in chunks so that the
coefficient tensors stay under ``memory_budget`` elements.

The intermediate bounds of the convolutional part (the steps before the first one whose kind
has no patch rule: Flatten, Linear) run on patches instead
(:mod:`acert.bounds.patches`): a neuron's coefficients only on its receptive field, the same
bounds up to rounding at a fraction of the time and memory. The neurons after those and the
output margins use the dense pass here, which is also kept for every step with
``use_patches=False``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from acert.bounds import ibp, patches
from acert.bounds.activations import Relaxation, relu_relaxation
from acert.bounds.channels import BatchStats
from acert.bounds.interval import Interval
from acert.bounds.kind_rules import WalkStep
from acert.bounds.kinds import output_shapes, walk
from acert.bounds.network import Network
from acert.bounds.overflow import uncertified_unless_finite
from acert.bounds.rounding import step_errors
from acert.bounds.spec import folded_margin_layer, margin_matrix
from acert.foundation.errors import AcertError
from acert.models.graph import INPUT

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "Relaxation",
    "crown_margins",
    "memory_budget",
    "relu_relaxation",
]

DEFAULT_MEMORY_BUDGET = 2**26
"""Elements of one chunk's coefficient tensor (256 MiB in float32)."""

_budget = [DEFAULT_MEMORY_BUDGET]


@contextlib.contextmanager
def memory_budget(elements: int) -> Iterator[None]:
    """Cap the coefficient tensor of every CROWN backward chunk in a block (peak memory is a
    small multiple of it); e.g. ``with memory_budget(2**24): certify(...)``."""
    if elements < 1:
        raise AcertError(f"the CROWN memory budget must be >= 1 element, got {elements}")
    _budget.append(elements)
    try:
        yield
    finally:
        _budget.pop()


def _is_affine_exact(steps: Sequence[WalkStep]) -> bool:
    """IBP is exact on a chain of elementwise steps with at most one other affine one."""
    if any(step.kind.exactness == "relaxed" for step in steps):
        return False
    return sum(step.kind.exactness == "affine" for step in steps) <= 1


def _crown_preactivation(
    net: Network,
    end: int,
    ibp_bounds: Interval,
    undecided: Tensor,
    budget: int,
    use_patches: bool,
) -> Interval:
    """CROWN bounds of the output of ``steps[:end]`` for its ``undecided`` neurons, ∩ IBP:
    on patches (:mod:`acert.bounds.patches`) for a conv-stage step, else dense."""
    if use_patches and patches.supports(net.steps[:end], ibp_bounds.shape[1:]):
        return patches.preactivation_bounds(net, end, ibp_bounds, undecided, budget)
    return _dense_preactivation(net, end, ibp_bounds, undecided, budget)


def _dense_preactivation(
    net: Network, end: int, ibp_bounds: Interval, undecided: Tensor, budget: int
) -> Interval:
    """CROWN bounds by the dense backward pass: coefficients on whole layer tensors."""
    lower, upper = ibp_bounds.lower.flatten(1).clone(), ibp_bounds.upper.flatten(1).clone()
    unstable = undecided.flatten(1)
    shape = ibp_bounds.shape[1:]
    widest = max(math.prod(s) for s in [*net.input_shapes[:end], tuple(shape)])
    chunk = max(1, budget // (2 * widest))
    # one sample at a time: its neurons are the specification rows of one query, so the
    # per-sample relaxations broadcast instead of being copied for every neuron
    for row in torch.nonzero(unstable.any(1), as_tuple=True)[0].tolist():
        neurons = torch.nonzero(unstable[row], as_tuple=True)[0]
        for start in range(0, neurons.numel(), chunk):
            n = neurons[start : start + chunk]
            k = n.numel()
            A = torch.zeros(1, 2 * k, math.prod(shape), dtype=lower.dtype, device=lower.device)
            spec = torch.arange(k, device=n.device)
            A[0, spec, n] = 1.0
            A[0, k + spec, n] = -1.0
            bias = torch.zeros(1, 2 * k, dtype=lower.dtype, device=lower.device)
            rows = torch.tensor([row], device=n.device)
            bounds = net.lower_bound(end, A.view(1, 2 * k, *shape), bias, rows)[0]
            lower[row, n] = torch.maximum(lower[row, n], bounds[:k])
            upper[row, n] = torch.minimum(upper[row, n], -bounds[k:])
    return Interval.from_bounds(lower.view_as(ibp_bounds.lower), upper.view_as(ibp_bounds.upper))


def _prepare(
    model: nn.Module | Sequence[nn.Module],
    box: Interval,
    stats: BatchStats | None,
    intermediate: str,
    budget: int,
    use_patches: bool,
    sound: bool = True,
) -> Network:
    """The network's steps with the relaxation of every relaxed step: IBP up to it, then (for
    CROWN) the backward pass's bounds of its input, which IBP then carries on from."""
    steps = walk(model)
    errors, sums = step_errors(steps, box, stats) if sound else ({}, {})
    shapes = output_shapes(steps, tuple(box.shape[1:]))
    firsts = [tuple(box.shape[1:]) if s.inputs[0] == INPUT else shapes[s.inputs[0]] for s in steps]
    net = Network(steps, firsts, box, stats, {}, errors, shapes, sums)
    relaxed = [step.index for step in steps if step.kind.relaxer is not None]
    if not relaxed:
        return net

    def refine(step: WalkStep, pre: Interval) -> Interval:
        relaxer = step.kind.relaxer
        assert relaxer is not None
        end = step.inputs[0] + 1
        if intermediate == "crown" and not _is_affine_exact(steps[:end]):
            undecided = relaxer.undecided(step.layer, pre)
            pre = _crown_preactivation(net, end, pre, undecided, budget, use_patches)
        net.relaxations[step.index] = relaxer.relax(step.layer, pre)
        if sound:
            net.errors[step.index] = relaxer.rounding(step.layer, pre, net.relaxations[step.index])
        return pre

    ibp.program(steps, stats, sound).run(box, end=relaxed[-1] + 1, refine=refine)
    return net


def crown_margins(
    model: nn.Sequential,
    box: Interval,
    y: Tensor,
    stats: BatchStats | None = None,
    intermediate: str = "crown",
    memory_budget: int | None = None,
    use_patches: bool = True,
    sound: bool = True,
) -> Tensor:
    """Lower bounds of ``f_y - f_t`` for t != y by a backward pass from the output.

    Args:
        model: a supported ``nn.Sequential`` or :class:`acert.models.GraphNet` ending in
            ``nn.Linear``.
        box: input interval (B, ...), already clipped to the domain.
        y: (B,) labels.
        stats: clean-batch statistics for train-mode batch-norms.
        intermediate: ``"crown"`` (CROWN) or ``"ibp"`` (CROWN-IBP) pre-activation bounds.
        memory_budget: elements per chunk of backward coefficients (default: the innermost
            :func:`memory_budget` block, else ``DEFAULT_MEMORY_BUDGET``).
        use_patches: bound the neurons of convolutional layers on their receptive fields
            (:mod:`acert.bounds.patches`); False runs the dense pass everywhere (the same bounds
            up to rounding, much slower; kept for tests and comparisons).
        sound: IBP intermediate bounds widened for rounding (False for a training objective:
            see :data:`acert.bounds.kind_rules.IntervalRule`).

    Returns:
        (B, K-1) lower bounds, classes in increasing order with y left out.
    """
    memory_budget = _budget[-1] if memory_budget is None else memory_budget
    net = _prepare(model, box, stats, intermediate, memory_budget, use_patches, sound)
    last = net.steps[-1]  # folded with the specification
    assert isinstance(last.layer, nn.Linear) and last.norm is None
    end = last.inputs[0] + 1
    A, bias = folded_margin_layer(last.layer, y)
    if bias is None:
        bias = torch.zeros(A.shape[:2], dtype=A.dtype, device=A.device)
    rows = torch.arange(y.shape[0], device=y.device)
    error = _last_layer_error(net, last.index, y)
    widest = max(math.prod(shape) for shape in net.input_shapes)
    chunk = max(1, memory_budget // (A.shape[1] * widest))
    margins = torch.cat(
        [
            net.lower_bound(
                end,
                A[s : s + chunk],
                bias[s : s + chunk],
                rows[s : s + chunk],
                None if error is None else error[s : s + chunk],
            )
            for s in range(0, y.shape[0], chunk)
        ]
    )
    # an overflow the sound intervals marked (acert.bounds.overflow) gives no certificate
    return uncertified_unless_finite(margins) if sound else margins


def _last_layer_error(net: Network, position: int, y: Tensor) -> Tensor | None:
    """(B, K-1) the rounding of the logits ``z_y`` and ``z_t`` that the model computes and of
    the folded rows ``W_y - W_t``: each logit's own rounding bound, added, so that the
    cancellation of ``W_y`` against ``W_t`` cannot hide it; None for plain arithmetic."""
    if position not in net.errors:
        return None
    step = net.errors[position]
    spec = margin_matrix(y, step.elementwise.shape[1], step.elementwise.dtype).abs()
    return torch.bmm(spec, step.elementwise.unsqueeze(-1)).squeeze(-1) + step.absolute[:, None]
