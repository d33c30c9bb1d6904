"""Tiny networks for the bound and radius tests, and an independent reference forward."""

from __future__ import annotations

import torch
from torch import nn

from acert.models import Normalize

TINY_NETS = ("mlp", "mlp-bn", "cnn", "cnn-bn")
"""Names accepted by the ``tiny_net`` fixture."""


def _set_batchnorm_stats(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters for every batch-norm."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.3 + 2 * torch.rand(c, generator=generator))
                m.weight.copy_(torch.randn(c, generator=generator))
                m.bias.copy_(0.3 * torch.randn(c, generator=generator))


def build_tiny_net(name: str, seed: int = 0) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A tiny eval-mode network and its per-sample input shape.

    - ``mlp``: 4 -> 8 -> 6 -> 3.
    - ``mlp-bn``: 5 -> 6 -> 5 -> 4 with BatchNorm1d after both hidden linears.
    - ``cnn``: (2, 6, 6), conv 3x3 stride 2 padding 0 without bias (its transpose needs
      output_padding 1), conv 2x2 padding 1, linear.
    - ``cnn-bn``: (1, 8, 8), conv 3x3 stride 2 padding 1 + BN2d (output_padding 1 again),
      conv 2x2 stride 2 padding 0 without bias + BN2d, linear + BN1d, linear.
    """
    torch.manual_seed(seed)
    if name == "mlp":
        layers = [
            Normalize([0.45, 0.5, 0.4, 0.55], [0.3, 0.2, 0.35, 0.25]),
            nn.Linear(4, 8),
            nn.ReLU(),
            nn.Linear(8, 6),
            nn.ReLU(),
            nn.Linear(6, 3),
        ]
        shape: tuple[int, ...] = (4,)
    elif name == "mlp-bn":
        layers = [
            Normalize([0.4, 0.5, 0.6, 0.3, 0.5], [0.2, 0.3, 0.25, 0.4, 0.5]),
            nn.Linear(5, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.Linear(6, 5),
            nn.BatchNorm1d(5),
            nn.ReLU(),
            nn.Linear(5, 4),
        ]
        shape = (5,)
    elif name == "cnn":
        layers = [
            Normalize([0.4, 0.6], [0.3, 0.2]),
            nn.Conv2d(2, 3, 3, stride=2, padding=0, bias=False),
            nn.ReLU(),
            nn.Conv2d(3, 2, 2, stride=1, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        ]
        shape = (2, 6, 6)
    elif name == "cnn-bn":
        layers = [
            Normalize([0.5], [0.25]),
            nn.Conv2d(1, 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.Conv2d(2, 3, 2, stride=2, padding=0, bias=False),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 5),
            nn.BatchNorm1d(5),
            nn.ReLU(),
            nn.Linear(5, 3),
        ]
        shape = (1, 8, 8)
    else:
        raise KeyError(name)
    model = nn.Sequential(*layers)
    _set_batchnorm_stats(model, torch.Generator().manual_seed(seed + 1000))
    return model.eval(), shape


def reference_logits(model: nn.Sequential, x: torch.Tensor, stats=None) -> torch.Tensor:
    """The model's output where every batch-norm listed in ``stats`` normalises with those
    (mean, biased variance) instead of its own; an independent re-implementation of the
    train-mode semantics of the bounds (``stats`` from ``acert.bounds.clean_forward``)."""
    h = x
    with torch.no_grad():
        for layer in model:
            if stats is not None and layer in stats:
                mean, var = stats[layer]
                shape = (1, -1) + (1,) * (h.dim() - 2)
                h = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps)
                h = h * layer.weight.view(shape) + layer.bias.view(shape)
            else:
                h = layer(h)
    return h


def true_margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K-1) ``z_y - z_t`` for t != y in increasing order."""
    k = logits.shape[1]
    others = torch.stack([torch.tensor([t for t in range(k) if t != int(c)]) for c in y])
    return logits.gather(1, y[:, None]) - logits.gather(1, others)
