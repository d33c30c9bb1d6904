"""Folding a model's :class:`~acert.models.Normalize` layer into its first affine layer, for export.

``acert export`` writes networks whose ONNX graph starts with the first Conv or Gemm: a leading
``Sub``/``Div`` pair (what the Normalize layer exports to) stops some verifiers from loading the
file (docs/VERIFIERS.md). :func:`fold_normalize` returns an equivalent copy of the model without
the Normalize layer. With ``s`` the per-channel std and ``m`` the mean, the first layer
``f(z) = W z + b`` applied to ``z = (x - m) / s`` becomes:

- a Linear layer (after an optional Flatten): ``W' = W / s`` per input feature and
  ``b' = b - W' m``; exact.
- a Conv2d layer: ``W' = W / s`` per input channel and ``b' = b - sum(W' * m)`` over each kernel.
  That is exact wherever the kernel lies inside the image. A conv that zero-pads its input pads
  the *normalised* image with 0, i.e. the raw image with ``m``, so at the border the folded conv
  (which pads the raw image with 0) misses the padded taps' ``sum(W' * m)``. When the conv pads
  and some mean is nonzero, the fold adds that difference back as a constant map
  ``D = f(normalise(0)) - f'(0)`` of the conv's output shape (zero inside, nonzero on the border
  rows and columns), computed in float64. If the conv is followed by a BatchNorm2d in eval mode,
  the map goes after it, scaled by the batch norm's per-channel factor, so that the ONNX exporter
  still merges the batch norm into the conv; the graph then reads ``Conv, Add, Relu, ...``.

The map is used rather than an explicit ``Pad`` node of value ``m`` because such a node would
come before the conv, needs equal means on all channels (ONNX pads with one value), and is
bounded by some bound propagation code as if it padded with 0 (auto_LiRPA's ``BoundPad`` returns
no bias term for the pad value), which would make a verifier's bounds unsound.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.foundation.errors import AcertError
from acert.models import Normalize

__all__ = ["AddConstant", "fold_normalize"]


class AddConstant(nn.Module):
    """``x + value``, with ``value`` a fixed tensor that broadcasts over ``x`` (a buffer)."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.value


def fold_normalize(model: nn.Module, example: Tensor) -> nn.Sequential:
    """An eval-mode copy of ``model`` with its leading Normalize folded into the first affine layer.

    Args:
        model: an ``nn.Sequential`` whose first module is :class:`Normalize` (every acert model);
            a Sequential without one is copied unchanged.
        example: an input of the model's shape (1, C, H, W), used for the conv border map's size.

    Raises:
        AcertError: the first layer after Normalize (and an optional Flatten) is not a Linear or
            an ungrouped Conv2d.
    """
    if not isinstance(model, nn.Sequential):
        raise AcertError(
            f"export folds the input normalisation into an nn.Sequential model, got "
            f"{type(model).__name__}; report this with the model name"
        )
    layers = [copy.deepcopy(module).eval() for module in model]
    if not layers or not isinstance(layers[0], Normalize):
        return nn.Sequential(*layers)
    norm, rest = layers[0], layers[1:]
    position = 0
    while position < len(rest) and isinstance(rest[position], nn.Flatten | nn.Identity):
        position += 1
    first = rest[position] if position < len(rest) else None
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            _check_flatten(rest[:position])
            rest[position] = _fold_linear(first, norm)
        elif isinstance(first, nn.Conv2d) and position == 0:
            rest = _fold_conv(first, norm, rest, example)
        else:
            found = type(first).__name__ if first is not None else "nothing"
            raise AcertError(
                f"export cannot fold the input normalisation into {found}: the layer after "
                "Normalize must be a Conv2d or a Linear (after a Flatten); report this with "
                "the model name"
            )
    return nn.Sequential(*rest)


def _check_flatten(between: list[nn.Module]) -> None:
    """The modules between Normalize and a Linear flatten (C, H, W) in C order, or do nothing."""
    for module in between:
        if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
            raise AcertError(
                f"export cannot fold the input normalisation through {module}: only a Flatten "
                "of all but the batch dimension is supported; report this with the model name"
            )


def _fold_linear(layer: nn.Linear, norm: Normalize) -> nn.Linear:
    """``layer`` applied to the normalised input, as one Linear on the raw flattened input."""
    channels = len(norm.mean)
    if layer.in_features % channels:
        raise AcertError(
            f"the first Linear layer has {layer.in_features} inputs, not a multiple of the "
            f"{channels} normalised channels; report this with the model name"
        )
    per_channel = layer.in_features // channels  # C-order flattening: channel-major
    mean = norm.mean.double().repeat_interleave(per_channel)
    std = norm.std.double().repeat_interleave(per_channel)
    weight = layer.weight.double() / std
    bias = _bias(layer.bias, layer.out_features) - weight @ mean
    folded = nn.Linear(layer.in_features, layer.out_features)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    return folded


def _bias(bias: Tensor | None, size: int) -> Tensor:
    """A layer's bias in float64, zeros if it has none."""
    return bias.double() if bias is not None else torch.zeros(size, dtype=torch.float64)


def _fold_conv(
    conv: nn.Conv2d, norm: Normalize, rest: list[nn.Module], example: Tensor
) -> list[nn.Module]:
    """``rest`` (starting with ``conv``) with the normalisation folded into ``conv``."""
    if conv.groups != 1:
        raise AcertError(
            f"export cannot fold the input normalisation into a grouped Conv2d "
            f"(groups={conv.groups}); report this with the model name"
        )
    mean, std = norm.mean.double(), norm.std.double()
    weight = conv.weight.double() / std.view(1, -1, 1, 1)
    bias = _bias(conv.bias, conv.out_channels) - (weight * mean.view(1, -1, 1, 1)).sum((1, 2, 3))
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        padding_mode=conv.padding_mode,
    )
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    rest = [folded, *rest[1:]]
    if not _pads_with_zeros(conv) or not bool((norm.mean != 0).any()):
        return rest  # exact: no padded taps, or padding 0 is the normalised mean 0
    # the border correction: what the conv gives on a zero image minus what the fold gives
    zero_image = torch.zeros_like(example[:1], dtype=torch.float64)
    normalised = (zero_image - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    expected = _conv64(conv, normalised, conv.weight.double(), _bias(conv.bias, len(bias)))
    border = expected - _conv64(conv, zero_image, weight, bias)
    after = 1
    if len(rest) > 1 and isinstance(rest[1], nn.BatchNorm2d) and rest[1].running_var is not None:
        bn = rest[1]
        scale = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        border, after = border * scale.view(1, -1, 1, 1), 2
    rest.insert(after, AddConstant(border.float()))
    return rest


def _pads_with_zeros(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` reads padded zeros anywhere (reflect/replicate/circular pads are exact)."""
    if conv.padding_mode != "zeros":
        return False  # those copy normalised pixels, i.e. normalise copied raw pixels
    if conv.padding == "valid":
        return False
    return conv.padding == "same" or any(p > 0 for p in conv.padding)


def _conv64(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``conv``'s geometry (stride, padding, dilation) applied in float64 with given parameters."""
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)
