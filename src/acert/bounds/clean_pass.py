"""What the bound methods share about a model's layers: which are supported (from the table of
layer kinds, :mod:`acert.bounds.kinds`), and batch-norm statistics.

Batch-norm in eval mode uses its running statistics. In train mode the bounds use the mean and
(biased) variance of the *clean* batch at that layer, as auto_LiRPA does; :func:`clean_forward`
runs the ordinary forward pass and records them, so a training method pays for them once.
When several processes train together (:mod:`acert.foundation.process_group`), the clean batch is
the global batch: the statistics are those of all processes' inputs, as one process would see them.
Both passes follow the walk over the model (:func:`acert.bounds.kinds.walk`), node by node in
topological order, as the bounds do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from acert.bounds.channels import (
    BatchStats,
    batchnorm_affine,
    channel_affine,
    channel_shift_magnitude,
    fold_batchnorm,
    folded_bias_magnitude,
    uses_batch_stats,
)
from acert.bounds.kind_rules import WalkStep
from acert.bounds.kinds import (
    SUPPORTED_LAYERS,
    check_certifiable,
    check_supported,
    kind_for,
    walk,
)
from acert.foundation import process_group as distributed
from acert.foundation.errors import UnsupportedModelError
from acert.models.graph import INPUT

__all__ = [
    "SUPPORTED_LAYERS",
    "BatchStats",
    "channel_affine",
    "channel_shift_magnitude",
    "check_fixed_normalisation",
    "check_supported",
    "clean_forward",
    "fold_batchnorm",
    "folded_bias_magnitude",
    "forward_with_stats",
    "needs_batch_stats",
    "uses_batch_stats",
]


def check_fixed_normalisation(model: nn.Module, stats: BatchStats | None = None) -> None:
    """Refuse layers that make ``model(x)`` depend on more than x: batch-norms that normalise
    with the current batch (train mode, or ``track_running_stats=False``; fixed running
    statistics make it a function of x) and Dropout in train mode
    (:func:`acert.bounds.kinds.check_certifiable`). With ``stats`` (clean-batch statistics,
    :func:`clean_forward`), the batch-norms they hold pass: the bounds are then of the
    function those statistics fix; every other layer is checked all the same."""
    if not stats:
        check_certifiable(model)
        return
    for where, module in model.named_modules():
        kind = None if module in stats else kind_for(type(module))
        check = None if kind is None else kind.certify_check
        if check is not None and (problem := check(module)):
            raise UnsupportedModelError(f"layer {where} ({kind.name}) {problem}")


def needs_batch_stats(model: nn.Module) -> bool:
    """True when some batch-norm uses batch statistics (bounds then need the clean batch's)."""
    return any(uses_batch_stats(m) for m in model.modules())


def clean_forward(
    model: nn.Module, x: Tensor, update_running_stats: bool = True
) -> tuple[Tensor, BatchStats]:
    """The model's output on clean inputs and the batch statistics of its train-mode batch-norms.

    Across several processes (``torch.distributed`` initialised, world size > 1) the statistics
    are those of the global batch, all processes' ``x`` together, and the running averages are
    updated with them as ``nn.BatchNorm`` would; every process must then make the same calls.

    Args:
        model: an ``nn.Sequential`` or :class:`acert.models.GraphNet`.
        x: (B, ...) clean inputs (this process's share of the batch).
        update_running_stats: when False, train-mode batch-norms normalise with the batch
            statistics without touching their running averages (for bound-only passes).

    Returns:
        logits (B, K) exactly as ``model(x)`` computes them, and the statistics.

    Raises a one-line error for an in-place layer whose write the pass would observe (as the
    bounds do: :func:`acert.bounds.kinds.walk`), so training fits the function it bounds.
    """
    steps = walk(model)
    _refuse_shared_batch_stats(steps)
    stats: BatchStats = {}
    global_batch = distributed.active()

    def apply(module: nn.Module, h: Tensor) -> Tensor:
        if not uses_batch_stats(module):
            return module(h)
        dims = [0, *range(2, h.dim())]
        if global_batch:
            return _normalise_globally(module, h, dims, stats, update_running_stats)
        stats[module] = (h.mean(dims), h.var(dims, unbiased=False))
        if not update_running_stats:
            return _normalise(module, h, *stats[module])
        return module(h)

    return _forward(steps, x, apply), stats


def _refuse_shared_batch_stats(steps: tuple[WalkStep, ...]) -> None:
    """One line for a batch-norm on batch statistics at two nodes of the graph: the model
    normalises each with that node's statistics, but the statistics are kept per module."""
    seen: dict[nn.Module, str] = {}
    for step in steps:
        for module, where in ((step.layer, step.where), (step.norm, step.norm_where)):
            if module is None or not uses_batch_stats(module):
                continue
            if module in seen:
                raise UnsupportedModelError(
                    f"layer {where} ({type(module).__name__}) is layer {seen[module]} too and "
                    "normalises with batch statistics, which differ at each node, but the "
                    "bounds keep one set per module; give each node a batch-norm of its own, "
                    "or call model.eval()"
                )
            seen[module] = where


def forward_with_stats(model: nn.Module, x: Tensor, stats: BatchStats) -> Tensor:
    """``model(x)`` with every batch-norm in ``stats`` normalising by those clean-batch statistics.

    Other inputs of the same batch (adversarial points, a radius search's inputs) thus see the
    function the bounds see, and the running statistics stay those of the clean pass.

    Args:
        model: an ``nn.Sequential`` or :class:`acert.models.GraphNet`.
        x: (B, ...) inputs, e.g. adversarial points of the batch ``stats`` came from.
        stats: from :func:`acert.bounds.clean_forward` (empty in eval mode).

    Returns:
        (B, K) logits.
    """

    def apply(module: nn.Module, h: Tensor) -> Tensor:
        if module not in stats:
            return module(h)
        scale, shift = channel_affine(module, stats)
        shape = (1, -1) + (1,) * (h.dim() - 2)
        return h * scale.view(shape) + shift.view(shape)

    return _forward(walk(model), x, apply)


def _forward(
    steps: tuple[WalkStep, ...], x: Tensor, apply: Callable[[nn.Module, Tensor], Tensor]
) -> Tensor:
    """The model's forward pass along its walk, each single-input module (and folded
    batch-norm) run by ``apply``, a kind of several inputs by its kind (``LayerKind.run``); a
    node's output kept while a later step reads it."""
    last_read = {i: step.index for step in steps for i in step.inputs}
    values: dict[int, Tensor] = {INPUT: x}
    h = x
    for step in steps:
        ins = [values[i] for i in step.inputs]
        h = apply(step.layer, ins[0]) if step.kind.arity == 1 else step.kind.run(step, *ins)
        if step.norm is not None:
            h = apply(step.norm, h)
        values[step.index] = h
        for i in step.inputs:
            if last_read[i] == step.index:
                values.pop(i, None)
    return h


def _normalise_globally(
    layer: _BatchNorm, h: Tensor, dims: list[int], stats: BatchStats, update: bool
) -> Tensor:
    """Batch-norm with the statistics of all processes' inputs, recorded in ``stats``."""
    mean, var, count = distributed.batch_moments(h, dims)
    stats[layer] = (mean, var)
    if update:
        _update_running_stats(layer, mean, var, count)
    return _normalise(layer, h, mean, var)


def _update_running_stats(layer: _BatchNorm, mean: Tensor, var: Tensor, count: Tensor) -> None:
    """What ``nn.BatchNorm`` does in train mode: a momentum average (a cumulative one when
    momentum is None) of the mean and of the unbiased variance, and one more batch counted."""
    if not (layer.training and layer.track_running_stats and layer.running_mean is not None):
        return
    factor = 0.0 if layer.momentum is None else layer.momentum
    with torch.no_grad():
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.add_(1)
            if layer.momentum is None:
                factor = 1.0 / float(layer.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp(min=1)
        layer.running_mean.mul_(1 - factor).add_(factor * mean.to(layer.running_mean.dtype))
        layer.running_var.mul_(1 - factor).add_(factor * unbiased.to(layer.running_var.dtype))


def _normalise(layer: _BatchNorm, h: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    scale, shift = batchnorm_affine(layer, mean, var)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    return h * scale.view(shape) + shift.view(shape)
