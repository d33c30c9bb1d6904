"""Folding a model's :class:`~acert.models.Normalize` layer into its first affine layer, for export.

``acert export`` writes networks whose ONNX graph starts with a Conv or Gemm: a leading
``Sub``/``Div`` pair (what the Normalize layer exports to) stops some verifiers from loading the
file (docs/VERIFIERS.md). :func:`fold_normalize` returns an equivalent copy of the model without
the Normalize layer. With ``s`` the per-channel std and ``m`` the mean, the first layer
``f(z) = W z + b`` applied to ``z = (x - m) / s`` becomes:

- a Linear layer (after an optional Flatten): ``W' = W / s`` per input feature and
  ``b' = b - W' m``; exact.
- a Conv2d layer that reads no padded zeros (padding 0, a reflect/replicate/circular padding
  mode, or all means 0): ``W' = W / s`` per input channel and ``b' = b - sum(W' * m)`` over each
  kernel; exact.
- a Conv2d layer that zero-pads and some mean is nonzero: not folded. Such a conv pads the
  *normalised* image with 0, i.e. the raw image with ``m``, which no conv on the raw image
  reproduces at the border. The normalisation becomes a leading 1x1 Conv2d instead (weights
  ``1/s`` on the diagonal, bias ``-m/s``, computed in float64), followed by the unchanged conv;
  the graph reads ``Conv (1x1), Conv, ...``.

Two other exact encodings are not used. A constant map added after the folded conv (zero
inside, the missing padded taps on the border) crashes auto_LiRPA's patches mode, the default
of αβ-CROWN: it concretises a constant node's term by expanding the constant to the network
*input's* shape, and the map has the conv's output channels. An explicit ``Pad`` node of value
``m`` needs equal means on all channels (ONNX pads with one value) and is bounded by
auto_LiRPA's ``BoundPad`` as if it padded with 0, which would make a verifier's bounds unsound.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from acert.foundation.errors import AcertError
from acert.models import INPUT, GraphNet, Normalize

__all__ = ["fold_normalize", "normalize_as_conv"]


def fold_normalize(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with its leading Normalize folded into the first affine layer
    (or, before a zero-padded conv with a nonzero mean, encoded as a leading 1x1 conv).

    Args:
        model: an ``nn.Sequential`` whose first module is :class:`Normalize` (every acert model),
            or a :class:`GraphNet` (a traced model, :func:`acert.bounds.bounds_form`) whose
            first node is (:func:`_fold_graph`); one without a Normalize is copied unchanged.

    Raises:
        AcertError: the first layer after Normalize (and an optional Flatten) is not a Linear or
            an ungrouped Conv2d.
    """
    if isinstance(model, GraphNet):
        return _fold_graph(copy.deepcopy(model).eval())
    if not isinstance(model, nn.Sequential):
        raise AcertError(
            f"export folds the input normalisation into an nn.Sequential or a GraphNet, got "
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
            rest = _fold_conv(first, norm, rest)
        else:
            found = type(first).__name__ if first is not None else "nothing"
            raise AcertError(
                f"export cannot fold the input normalisation into {found}: the layer after "
                "Normalize must be a Conv2d or a Linear (after a Flatten); report this with "
                "the model name"
            )
    return nn.Sequential(*rest)


def _fold_graph(graph: GraphNet) -> GraphNet:
    """``graph`` (a copy) with its first node, a Normalize of the input read by nothing else,
    folded into each node that reads it: a Conv2d, or the Linear layers behind a Flatten. Where
    some reading conv zero-pads with a nonzero mean, the Normalize node becomes a 1x1 conv."""
    nodes = list(zip(graph.names, graph.nodes, graph.inputs, strict=True))
    norm = graph.nodes[0]
    readers = [i for i, inputs in enumerate(graph.inputs) if 0 in inputs]
    if not isinstance(norm, Normalize) or any(INPUT in inputs for inputs in graph.inputs[1:]):
        return graph
    if any(len(graph.inputs[i]) != 1 for i in readers):
        raise AcertError(
            "export cannot fold the input normalisation into a join of branches (Add, Concat) "
            "that reads it; report this with the model name"
        )
    targets: list[int] = []
    for i in readers:
        module = graph.nodes[i]
        if isinstance(module, nn.Conv2d):
            targets.append(i)
            continue
        behind = [j for j, inputs in enumerate(graph.inputs) if i in inputs]
        if not isinstance(module, nn.Flatten) or not all(
            isinstance(graph.nodes[j], nn.Linear) for j in behind
        ):
            raise AcertError(
                f"export cannot fold the input normalisation into {type(module).__name__}: "
                "the layers reading Normalize must be Conv2d or a Flatten before Linear layers; "
                "report this with the model name"
            )
        _check_flatten([module])
        targets += behind
    with torch.no_grad():
        convs = [graph.nodes[i] for i in targets if isinstance(graph.nodes[i], nn.Conv2d)]
        if any(_pads_with_zeros(conv) for conv in convs) and bool((norm.mean != 0).any()):
            nodes[0] = (nodes[0][0], normalize_as_conv(norm), nodes[0][2])
            return GraphNet(nodes)
        for i in targets:
            name, module, inputs = nodes[i]
            if isinstance(module, nn.Linear):
                folded = _fold_linear(module, norm)
            else:
                folded = _fold_conv(module, norm, [module])[0]
            nodes[i] = (name, folded, inputs)
    shift = {INPUT: INPUT, 0: INPUT}  # the readers of Normalize read the input itself
    return GraphNet(
        [
            (name, module, [shift.get(i, i - 1) for i in inputs])
            for name, module, inputs in nodes[1:]
        ]
    )


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


def _fold_conv(conv: nn.Conv2d, norm: Normalize, rest: list[nn.Module]) -> list[nn.Module]:
    """``rest`` (starting with ``conv``) with the normalisation folded into ``conv``, or put
    before it as a 1x1 conv where the fold would be inexact at the border."""
    if conv.groups != 1:
        raise AcertError(
            f"export cannot fold the input normalisation into a grouped Conv2d "
            f"(groups={conv.groups}); report this with the model name"
        )
    if _pads_with_zeros(conv) and bool((norm.mean != 0).any()):
        return [normalize_as_conv(norm), *rest]
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
    return [folded, *rest[1:]]


def normalize_as_conv(norm: Normalize) -> nn.Conv2d:
    """``(x - mean) / std`` per channel as a 1x1 Conv2d: weights ``1/std`` on the diagonal,
    bias ``-mean/std`` (computed in float64, stored in float32)."""
    mean, std = norm.mean.double().flatten(), norm.std.double().flatten()
    channels = len(mean)
    conv = nn.Conv2d(channels, channels, 1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.diag(1 / std).view(channels, channels, 1, 1))
        conv.bias.copy_(-mean / std)
    return conv


def _pads_with_zeros(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` reads padded zeros anywhere (reflect/replicate/circular pads are exact)."""
    if conv.padding_mode != "zeros":
        return False  # those copy normalised pixels, i.e. normalise copied raw pixels
    if conv.padding == "valid":
        return False
    return conv.padding == "same" or any(p > 0 for p in conv.padding)
