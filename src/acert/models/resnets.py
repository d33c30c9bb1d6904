"""A ResNet written the way papers and torchvision write one: ``nn.Module`` classes with their
own ``forward``, projection shortcuts where the shape changes.

Registered as ``resnet-cifar`` (:mod:`acert.models.zoo`). It is deliberately not an
``nn.Sequential`` or a hand-built :class:`~acert.models.graph.GraphNet`: the bounds reach it
the way they reach a researcher's own network, by tracing its forward into a graph
(:mod:`acert.bounds.tracing`), so the registry itself shows that path working; the graph
shares the modules, so checkpoints hold this class's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from acert.models.layers import Normalize

__all__ = ["BasicBlock", "ResNetCIFAR"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` without pre-activation (He et al.
    2016), the block of the CROWN-IBP and CTBench ResNets; the shortcut is the identity, or a
    1x1 convolution of the block's stride and a batch-norm where the shape changes.

    Args:
        c_in, c_out: channels in and out.
        stride: of the first 3x3 convolution (and of the projection).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """Normalize, conv3x3(w)-BN-ReLU, ``blocks`` blocks of width w, ``blocks`` of width 2w
    (the first with stride 2 and a projection shortcut), avg-pool 2x2, flatten,
    linear(linear_width)-ReLU, linear(classes).

    Args:
        in_shape: input shape (C, H, W).
        num_classes: number of output logits.
        mean, std: dataset normalisation, one value per channel.
        width: channels of the first stage (twice as many in the second).
        linear_width: width of the hidden linear layer.
        blocks: blocks per stage.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 16,
        linear_width: int = 128,
        blocks: int = 1,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        self.normalize = Normalize(mean, std)
        self.conv = nn.Conv2d(c, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stage1 = [BasicBlock(width, width) for _ in range(blocks)]
        stage2 = [BasicBlock(width, 2 * width, 2)]
        stage2 += [BasicBlock(2 * width, 2 * width) for _ in range(blocks - 1)]
        self.layer1, self.layer2 = nn.Sequential(*stage1), nn.Sequential(*stage2)
        features = 2 * width * ((h - 1) // 2 + 1) // 2 * (((w - 1) // 2 + 1) // 2)
        self.fc1 = nn.Linear(features, linear_width)
        self.fc2 = nn.Linear(linear_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(self.normalize(x))))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(F.avg_pool2d(x, 2), 1)
        return self.fc2(F.relu(self.fc1(x)))
