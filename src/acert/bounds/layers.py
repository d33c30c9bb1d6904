"""What the bound methods share about layers: the supported kinds, batch-norm statistics,
and the per-channel affine form of Normalize and batch-norm.

Batch-norm in eval mode uses its running statistics. In train mode the bounds use the mean and
(biased) variance of the *clean* batch at that layer, as auto_LiRPA does; :func:`clean_forward`
runs the ordinary forward pass and records them, so a training method pays for them once.
When several processes train together (:mod:`acert.distributed`), the clean batch is the
global batch: the statistics are those of all processes' inputs, as one process would see them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from acert import process_group as distributed
from acert.errors import UnsupportedModelError
from acert.models import Normalize

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
    "folds_into",
    "forward_with_stats",
    "needs_batch_stats",
    "uses_batch_stats",
]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    Normalize,
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.Flatten,
)

BatchStats = dict[nn.Module, tuple[Tensor, Tensor]]
"""Batch-norm module -> (mean, biased variance) of its input on the clean batch."""


def check_supported(model: nn.Module) -> nn.Sequential:
    """Return ``model`` if bound propagation has a rule for each of its layers, else raise.

    The last layer must be ``nn.Linear``: the margin specification is folded into it.
    """
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        raise UnsupportedModelError(
            f"bounds need a non-empty torch.nn.Sequential, got {type(model).__name__}; "
            "build the model from acert.models or as nn.Sequential(Normalize(...), ...)"
        )
    _check_computes_its_layers(model)
    for position, layer in enumerate(model):
        # exact types: a subclass may override forward, and the rules dispatch on type(layer)
        if type(layer) not in SUPPORTED_LAYERS:
            names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise UnsupportedModelError(
                f"layer {position} ({type(layer).__name__}) has no bound rule; "
                f"supported layers are {names}"
            )
        if isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1):
            raise UnsupportedModelError(
                f"layer {position} (Flatten) flattens dims {layer.start_dim}..{layer.end_dim}; "
                "only nn.Flatten() of every dim after the batch is supported"
            )
        if isinstance(layer, nn.Conv2d) and (
            isinstance(layer.padding, str) or layer.padding_mode != "zeros"
        ):
            raise UnsupportedModelError(
                f"layer {position} (Conv2d) uses padding={layer.padding!r}, "
                f"padding_mode={layer.padding_mode!r}; use integer zero padding"
            )
    if not isinstance(model[-1], nn.Linear):
        raise UnsupportedModelError(
            f"the last layer must be nn.Linear (the margin specification is folded into it), "
            f"got {type(model[-1]).__name__}"
        )
    return model


def _check_computes_its_layers(model: nn.Sequential) -> None:
    """Refuse a model whose forward pass is not the chain of its layers: the bounds follow the
    layers, so a ``forward`` of its own (a subclass's, or one set on the instance) or a hook
    that changes inputs or outputs would make them bound another function than the model's."""
    name = type(model).__name__
    if type(model).forward is not nn.Sequential.forward or "forward" in vars(model):
        raise UnsupportedModelError(
            f"{name} defines its own forward, which the bounds cannot follow; certify an "
            "nn.Sequential of its layers (nn.Sequential(*model)) that computes the same function"
        )
    hooked = [
        f"{where} ({type(module).__name__})"
        for where, module in [("the model", model)]
        + [(f"layer {i}", layer) for i, layer in enumerate(model)]
        if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module)
    ]
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        hooked.append("every module (a global forward hook)")
    if hooked:
        raise UnsupportedModelError(
            f"forward hooks or a replaced forward on {', '.join(hooked)} change what the model "
            "computes, which the bounds cannot follow; remove them (handle.remove()) first"
        )


def check_fixed_normalisation(model: nn.Sequential) -> None:
    """Refuse batch-norms that normalise with the current batch: a certificate is about
    ``model(x)``, whose output would then depend on the other inputs of the batch (train mode,
    or ``track_running_stats=False``); fixed running statistics make it a function of x."""
    for position, layer in enumerate(model):
        if uses_batch_stats(layer):
            fix = (
                "call model.eval() first"
                if layer.running_mean is not None
                else "train it with track_running_stats=True, then call model.eval()"
            )
            raise UnsupportedModelError(
                f"layer {position} ({type(layer).__name__}) normalises with the statistics of "
                f"the current batch, so no input's prediction can be certified alone; {fix}"
            )


def uses_batch_stats(layer: nn.Module) -> bool:
    """True for a batch-norm that normalises with the current batch's statistics."""
    return isinstance(layer, _BatchNorm) and (layer.training or layer.running_mean is None)


def needs_batch_stats(model: nn.Sequential) -> bool:
    """True when some batch-norm uses batch statistics (bounds then need the clean batch's)."""
    return any(uses_batch_stats(m) for m in model)


def clean_forward(
    model: nn.Sequential, x: Tensor, update_running_stats: bool = True
) -> tuple[Tensor, BatchStats]:
    """The model's output on clean inputs and the batch statistics of its train-mode batch-norms.

    Across several processes (``torch.distributed`` initialised, world size > 1) the statistics
    are those of the global batch, all processes' ``x`` together, and the running averages are
    updated with them as ``nn.BatchNorm`` would; every process must then make the same calls.

    Args:
        model: an ``nn.Sequential``.
        x: (B, ...) clean inputs (this process's share of the batch).
        update_running_stats: when False, train-mode batch-norms normalise with the batch
            statistics without touching their running averages (for bound-only passes).

    Returns:
        logits (B, K) exactly as ``model(x)`` computes them, and the statistics.
    """
    stats: BatchStats = {}
    global_batch = distributed.active()
    h = x
    for layer in model:
        if uses_batch_stats(layer):
            dims = [0, *range(2, h.dim())]
            if global_batch:
                h = _normalise_globally(layer, h, dims, stats, update_running_stats)
                continue
            stats[layer] = (h.mean(dims), h.var(dims, unbiased=False))
            if not update_running_stats:
                h = _normalise(layer, h, *stats[layer])
                continue
        h = layer(h)
    return h, stats


def forward_with_stats(model: nn.Sequential, x: Tensor, stats: BatchStats) -> Tensor:
    """``model(x)`` with every batch-norm in ``stats`` normalising by those clean-batch statistics.

    Other inputs of the same batch (adversarial points, a radius search's inputs) thus see the
    function the bounds see, and the running statistics stay those of the clean pass.

    Args:
        model: an ``nn.Sequential``.
        x: (B, ...) inputs, e.g. adversarial points of the batch ``stats`` came from.
        stats: from :func:`acert.bounds.clean_forward` (empty in eval mode).

    Returns:
        (B, K) logits.
    """
    h = x
    for layer in model:
        if layer in stats:
            scale, shift = channel_affine(layer, stats)
            shape = (1, -1) + (1,) * (h.dim() - 2)
            h = h * scale.view(shape) + shift.view(shape)
        else:
            h = layer(h)
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
    scale, shift = _batchnorm_affine(layer, mean, var)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    return h * scale.view(shape) + shift.view(shape)


def _batchnorm_affine(layer: _BatchNorm, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    scale = (var + layer.eps).rsqrt()
    if layer.affine:
        scale = scale * layer.weight
        return scale, layer.bias - mean * scale
    return scale, -mean * scale


def channel_affine(layer: nn.Module, stats: BatchStats | None) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (C,), with ``layer(h) = h * scale + shift`` per channel.

    For Normalize and batch-norm; batch-norm in train mode takes its statistics from ``stats``.
    """
    if isinstance(layer, Normalize):
        return 1 / layer.std, -layer.mean / layer.std
    assert isinstance(layer, _BatchNorm)
    if uses_batch_stats(layer):
        if stats is None or layer not in stats:
            raise UnsupportedModelError(
                "a train-mode batch-norm needs clean-batch statistics; pass "
                "stats=clean_forward(model, x)[1] or call model.eval()"
            )
        return _batchnorm_affine(layer, *stats[layer])
    return _batchnorm_affine(layer, layer.running_mean, layer.running_var)


def channel_shift_magnitude(layer: nn.Module, stats: BatchStats | None) -> Tensor:
    """(C,) the sum of the absolute values of the terms of each channel's shift (what the
    shift's rounding is relative to): ``|mean/std|`` for Normalize, ``|β| + |mean·scale|`` for
    batch-norm."""
    if isinstance(layer, Normalize):
        return (layer.mean / layer.std).abs()
    scale, _ = channel_affine(layer, stats)
    mean = stats[layer][0] if uses_batch_stats(layer) else layer.running_mean
    magnitude = (mean * scale).abs()
    return magnitude + layer.bias.abs() if layer.affine else magnitude


def folded_bias_magnitude(
    layer: nn.Linear | nn.Conv2d, norm: nn.Module, stats: BatchStats | None
) -> Tensor:
    """(C,) the sum of the absolute values of the terms of :func:`fold_batchnorm`'s bias."""
    magnitude = channel_shift_magnitude(norm, stats)
    if layer.bias is None:
        return magnitude
    scale, _ = channel_affine(norm, stats)
    return magnitude + (layer.bias * scale).abs()


def folds_into(layer: nn.Module | None, norm: nn.Module | None) -> bool:
    """Whether ``norm`` is a batch-norm right after the linear/conv ``layer``, so that the
    bound passes treat the two as one layer (:func:`fold_batchnorm`)."""
    return isinstance(layer, nn.Linear | nn.Conv2d) and isinstance(
        norm, nn.BatchNorm1d | nn.BatchNorm2d
    )


def fold_batchnorm(
    layer: nn.Linear | nn.Conv2d, norm: nn.Module, stats: BatchStats | None
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of ``norm(layer(h))`` as one linear/convolution layer.

    ``BN(W h + b) = (s·W) h + (s·b + t)`` per output channel, with (s, t) from
    :func:`channel_affine`.
    """
    scale, shift = channel_affine(norm, stats)
    weight = layer.weight * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias * scale + shift
    return weight, bias
