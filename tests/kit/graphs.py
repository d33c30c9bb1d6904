"""Networks of the kinds researchers write, each an ``nn.Module`` with its own forward (traced
into a graph by :mod:`acert.bounds.tracing`): a plain CNN, a ResNet with projection shortcuts,
one joining branches with ``torch.cat``, one with LeakyReLU. Classes live at module level so
that ``acert.fit(..., out=...)`` can pickle them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acert.models import Normalize, ResNetCIFAR

__all__ = ["GRAPH_NETS", "CatNet", "CustomCNN", "LeakyNet", "build_graph_net"]


class CustomCNN(nn.Module):
    """conv, F.relu, torch.flatten, fc: the forward of a tutorial."""

    def __init__(self, channels: int = 1, classes: int = 10, side: int = 28) -> None:
        super().__init__()
        self.norm = Normalize([0.5] * channels, [0.25] * channels)
        self.conv = nn.Conv2d(channels, 4, 3, stride=2, padding=1)
        self.hidden = nn.Linear(4 * ((side + 1) // 2) ** 2, 32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(self.norm(x)))
        x = torch.flatten(x, 1)
        return self.fc(F.relu(self.hidden(x)))


class CatNet(nn.Module):
    """Two convolution branches joined along the channels by ``torch.cat``."""

    def __init__(self, channels: int = 1, classes: int = 10, side: int = 28) -> None:
        super().__init__()
        self.norm = Normalize([0.5] * channels, [0.25] * channels)
        self.left = nn.Conv2d(channels, 3, 3, stride=2, padding=1)
        self.right = nn.Conv2d(channels, 2, 1, stride=2)
        self.mix = nn.Conv2d(5, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * ((((side + 1) // 2) + 1) // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1)
        x = F.relu(self.mix(x))
        return self.fc(x.view(x.size(0), -1))


class LeakyNet(nn.Module):
    """An MLP with ``F.leaky_relu`` and an ``nn.LeakyReLU`` of another slope."""

    def __init__(self, channels: int = 1, classes: int = 10, side: int = 28) -> None:
        super().__init__()
        self.norm = Normalize([0.5] * channels, [0.25] * channels)
        self.fc1 = nn.Linear(channels * side * side, 32)
        self.act = nn.LeakyReLU(0.2)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).reshape(x.shape[0], -1)
        x = self.act(self.fc1(x))
        return self.fc3(F.leaky_relu(self.fc2(x), 0.05))


GRAPH_NETS = ("custom-cnn", "resnet", "cat", "leaky")
"""The names :func:`build_graph_net` takes."""


def build_graph_net(
    name: str, shape: tuple[int, ...] = (1, 28, 28), classes: int = 10, seed: int = 0
) -> nn.Module:
    """One of :data:`GRAPH_NETS` for inputs of ``shape`` (C, H, W) with H = W, in eval mode;
    ``resnet`` is the registry's ``resnet-cifar`` at width 4 (projection shortcuts)."""
    torch.manual_seed(seed)
    channels, side = shape[0], shape[1]
    if name == "resnet":
        mean, std = [0.5] * channels, [0.25] * channels
        return ResNetCIFAR(shape, classes, mean, std, width=4, linear_width=16).eval()
    net = {"custom-cnn": CustomCNN, "cat": CatNet, "leaky": LeakyNet}[name]
    return net(channels, classes, side).eval()
