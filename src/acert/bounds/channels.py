"""Normalize and batch-norm as per-channel affine maps, and a batch-norm folded into the
linear/convolution layer before it: the arithmetic every bound method shares about them.

Batch-norm in eval mode uses its running statistics. In train mode the bounds use the mean and
(biased) variance of the *clean* batch at that layer, as auto_LiRPA does
(:func:`acert.bounds.layers.clean_forward` records them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from acert.foundation.errors import UnsupportedModelError
from acert.models import Normalize

__all__ = [
    "BatchStats",
    "batchnorm_affine",
    "channel_affine",
    "channel_shift_magnitude",
    "fold_batchnorm",
    "folded_bias_magnitude",
    "normalisation_reach",
    "uses_batch_stats",
]

BatchStats = dict[nn.Module, tuple[Tensor, Tensor]]
"""Batch-norm module -> (mean, biased variance) of its input on the clean batch."""


def uses_batch_stats(layer: nn.Module) -> bool:
    """True for a batch-norm that normalises with the current batch's statistics."""
    return isinstance(layer, _BatchNorm) and (layer.training or layer.running_mean is None)


def batchnorm_affine(layer: _BatchNorm, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) of ``layer`` normalising with the given statistics."""
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
        return batchnorm_affine(layer, *stats[layer])
    return batchnorm_affine(layer, layer.running_mean, layer.running_var)


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


def normalisation_reach(layer: nn.Module, stats: BatchStats | None) -> tuple[Tensor, ...]:
    """(max |mean|, factor, offset), 0-d each, such that ``(|h| + max|mean|)·factor + offset``
    bounds every value the model's Normalize or batch-norm forms from an input with ``|h|``:
    ``(h - mean) / std``, or ``(h - mean)·invstd·w + β`` and ``h·s + t`` in any order
    (factor ``max(1, invstd, |s|)``, offset ``max|β|``) (:mod:`acert.bounds.overflow`)."""
    with torch.no_grad():
        scale, _ = channel_affine(layer, stats)
        factor = scale.detach().abs().amax().clamp(min=1)
        if isinstance(layer, Normalize):
            return layer.mean.abs().amax(), factor, factor.new_zeros(())
        assert isinstance(layer, _BatchNorm)
        mean, var = stats[layer] if uses_batch_stats(layer) else (layer.running_mean,
                                                                  layer.running_var)  # fmt: skip
        factor = torch.maximum(factor, (var.detach() + layer.eps).rsqrt().amax())
        offset = layer.bias.detach().abs().amax() if layer.affine else factor.new_zeros(())
        return mean.detach().abs().amax(), factor, offset
