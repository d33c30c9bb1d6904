"""The registered architectures: the CNN7 family of Shi et al. (2021), small ResNets, MLPs, IBP
initialisation.

Every model but ``resnet-cifar`` (an ``nn.Module`` of its own, :mod:`acert.models.resnets`)
is a plain ``torch.nn.Sequential``; each one's first module is :class:`Normalize`, so the
dataset normalisation is part of the network and inputs stay in pixel space [0, 1] (docs/METHOD.md,
"Threat model"). ``create_model(name, in_shape, num_classes, mean, std)`` builds a registered
architecture; ``list_models()`` names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from acert.foundation.errors import ConfigError
from acert.foundation.ranges import OneOf
from acert.models.layers import Normalize, Residual
from acert.models.resnets import ResNetCIFAR

__all__ = [
    "INITS",
    "MODELS",
    "cnn7",
    "create_model",
    "ibp_init_",
    "list_models",
    "mlp",
    "resnet",
]


def _conv_block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


def cnn7(
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 64,
    linear_width: int = 512,
    last_stride: int = 1,
) -> nn.Sequential:
    """CNN7 of Shi et al. 2021 (docs/METHOD.md, "Architecture CNN7") with scalable widths.

    conv3x3(w)-BN-ReLU, conv3x3(w)-BN-ReLU, conv3x3/2(2w)-BN-ReLU, conv3x3(2w)-BN-ReLU,
    conv3x3/last_stride(2w)-BN-ReLU, flatten, linear(linear_width)-BN-ReLU, linear(classes).

    Args:
        in_shape: input shape (C, H, W).
        num_classes: number of output logits.
        mean, std: dataset normalisation, one value per channel.
        width: channels of the first two convolutions (64 in the paper).
        linear_width: width of the hidden linear layer (512 in the paper).
        last_stride: stride of the fifth convolution (2 for TinyImageNet).
    """
    c, h, w = in_shape
    layers: list[nn.Module] = [Normalize(mean, std)]
    layers += _conv_block(c, width, 1)
    layers += _conv_block(width, width, 1)
    layers += _conv_block(width, 2 * width, 2)
    layers += _conv_block(2 * width, 2 * width, 1)
    layers += _conv_block(2 * width, 2 * width, last_stride)
    h_out, w_out = _strided(_strided(h, 2), last_stride), _strided(_strided(w, 2), last_stride)
    layers += [
        nn.Flatten(),
        nn.Linear(2 * width * h_out * w_out, linear_width),
        nn.BatchNorm1d(linear_width),
        nn.ReLU(),
        nn.Linear(linear_width, num_classes),
    ]
    return nn.Sequential(*layers)


def _strided(size: int, stride: int) -> int:
    """Output size of a 3x3 convolution with padding 1."""
    return (size - 1) // stride + 1


def _residual_block(width: int) -> list[nn.Module]:
    """``ReLU(x + BN(conv(ReLU(BN(conv(x))))))``, 3x3 convolutions of ``width`` channels."""
    body = nn.Sequential(
        *_conv_block(width, width, 1), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
    )
    return [Residual(body), nn.ReLU()]


def resnet(
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 16,
    linear_width: int = 128,
    blocks: int = 1,
) -> nn.Sequential:
    """A small ResNet (He et al. 2016), with the batch-norm and the linear head of CNN7, as the
    residual models Shi et al. (2021) train with IBP.

    conv3x3(w)-BN-ReLU, ``blocks`` residual blocks of width w, conv3x3/2(2w)-BN-ReLU, ``blocks``
    residual blocks of width 2w, avgpool 2x2, flatten, linear(linear_width)-BN-ReLU,
    linear(classes); a residual block is ``ReLU(x + BN(conv(ReLU(BN(conv(x))))))``.

    Args:
        in_shape: input shape (C, H, W).
        num_classes: number of output logits.
        mean, std: dataset normalisation, one value per channel.
        width: channels of the first stage (twice as many in the second).
        linear_width: width of the hidden linear layer.
        blocks: residual blocks per stage.
    """
    c, h, w = in_shape
    layers: list[nn.Module] = [Normalize(mean, std), *_conv_block(c, width, 1)]
    for _ in range(blocks):
        layers += _residual_block(width)
    layers += _conv_block(width, 2 * width, 2)
    for _ in range(blocks):
        layers += _residual_block(2 * width)
    h_out, w_out = _strided(h, 2) // 2, _strided(w, 2) // 2
    layers += [
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * h_out * w_out, linear_width),
        nn.BatchNorm1d(linear_width),
        nn.ReLU(),
        nn.Linear(linear_width, num_classes),
    ]
    return nn.Sequential(*layers)


def mlp(
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    hidden: Sequence[int] = (256, 256),
    batch_norm: bool = True,
) -> nn.Sequential:
    """Fully connected ReLU net: flatten, linear(-BN)-ReLU per hidden width, then linear."""
    layers: list[nn.Module] = [Normalize(mean, std), nn.Flatten()]
    fan_in = math.prod(in_shape)
    for width in hidden:
        layers.append(nn.Linear(fan_in, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


INITS = OneOf(("ibp", "default"))
"""Initialisations of :func:`create_model` (config key ``init``): :func:`ibp_init_` or PyTorch's."""


def ibp_init_(model: nn.Module) -> nn.Module:
    """IBP initialisation of Shi et al. 2021
    (docs/METHOD.md, "Warm-up regularisers and initialisation").

    Every conv kernel and linear weight except the last layer's is drawn from N(0, σ²) with
    σ = sqrt(2π) / fan_in; biases are set to zero. The last layer keeps PyTorch's default init.
    """
    affine = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for layer in affine[:-1]:
        fan_in = layer.weight[0].numel()
        nn.init.normal_(layer.weight, mean=0.0, std=math.sqrt(2 * math.pi) / fan_in)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return model


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: a builder and the keyword arguments that fix its size."""

    builder: Callable[..., nn.Module]
    kwargs: dict
    description: str


MODELS: dict[str, ModelSpec] = {
    "cnn7": ModelSpec(cnn7, {"width": 64, "linear_width": 512}, "CNN7 of Shi et al. (paper size)"),
    "cnn7-small": ModelSpec(cnn7, {"width": 16, "linear_width": 128}, "CNN7 at quarter width"),
    "cnn7-tiny": ModelSpec(cnn7, {"width": 8, "linear_width": 64}, "CNN7 at eighth width (CPU)"),
    "cnn7-tinyimagenet": ModelSpec(
        cnn7, {"width": 64, "linear_width": 512, "last_stride": 2}, "CNN7 for TinyImageNet (64x64)"
    ),
    "resnet-tiny": ModelSpec(
        resnet, {"width": 8, "linear_width": 64}, "ResNet of 2 residual blocks, CNN7-tiny widths"
    ),
    "resnet-cifar": ModelSpec(
        ResNetCIFAR,
        {"width": 8, "linear_width": 64, "blocks": 1},
        "ResNet with projection shortcuts, an nn.Module traced into a graph (CPU widths)",
    ),
    "mlp": ModelSpec(mlp, {"hidden": (256, 256)}, "MLP 256-256 with batch-norm"),
    "mlp-small": ModelSpec(mlp, {"hidden": (64, 64)}, "MLP 64-64 with batch-norm"),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODELS)


def create_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    init: str = "ibp",
    **overrides: object,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        in_shape: input shape (C, H, W).
        num_classes: number of classes.
        mean, std: dataset normalisation, one value per channel.
        init: ``"ibp"`` for the IBP initialisation, ``"default"`` for PyTorch's.
        **overrides: replace the registered size arguments (e.g. ``width=32``).
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    INITS.check(init, "init")
    if len(in_shape) != 3:
        raise ConfigError(f"in_shape must be (C, H, W), got {tuple(in_shape)}")
    if len(mean) != in_shape[0]:
        raise ConfigError(
            f"model input has {in_shape[0]} channels but {len(mean)} means were given"
        )
    spec = MODELS[name]
    model = spec.builder(in_shape, num_classes, mean, std, **{**spec.kwargs, **overrides})
    return ibp_init_(model) if init == "ibp" else model
