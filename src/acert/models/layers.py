"""The layers acert adds to ``torch.nn``: the dataset normalisation, the residual block, and the
two-input joins a traced network's graph is made of (:mod:`acert.models.graph`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from acert.foundation.errors import ConfigError

__all__ = ["Add", "Concat", "Normalize", "Residual"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first layer of every acert model.

    Args:
        mean: one value per input channel.
        std: one value per input channel, all positive.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(
                f"Normalize needs as many means as stds, got {len(mean)} and {len(std)}"
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"Normalize needs positive stds, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def channel_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """``t`` (C,) reshaped to broadcast over an input with ``ndim`` dimensions."""
        return t.view(1, -1, *([1] * (ndim - 2))) if ndim > 2 else t.view(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.channel_view(self.mean, x.dim())) / self.channel_view(self.std, x.dim())

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Residual(nn.Module):
    """``x + body(x)``: a residual block (He et al. 2016) whose body keeps its input's shape.

    Args:
        body: the layers of the residual branch; the bounds support an ``nn.Sequential`` of
            the layers they support (nested blocks included).
    """

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Add(nn.Module):
    """``a + b`` of two tensors of one shape: the join of a residual or projection shortcut
    (a graph node with two inputs, :class:`acert.models.graph.GraphNet`)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Concat(nn.Module):
    """``torch.cat(inputs, dim)``: the join of branches along a dimension (1: channels).

    Args:
        dim: the dimension, counting the batch as 0; at least 1.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        if dim < 1:
            raise ConfigError(f"Concat joins along a dimension after the batch (>= 1), got {dim}")
        self.dim = dim

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(inputs, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
