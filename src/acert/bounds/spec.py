"""The margin specification: for label y, the rows ``e_y - e_t`` for every class t != y."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ROUNDING_ULPS", "margin_matrix", "other_classes", "rounding_allowance"]

ROUNDING_ULPS = 256
"""Rounding allowance, in units of the dtype's machine epsilon, per unit of bound magnitude."""


def other_classes(y: Tensor, num_classes: int) -> Tensor:
    """(B, K-1) the classes other than each label, in increasing order.

    Args:
        y: (B,) labels in [0, num_classes).
        num_classes: K.
    """
    classes = torch.arange(num_classes - 1, device=y.device).expand(y.shape[0], -1)
    return classes + (classes >= y.unsqueeze(1)).long()


def margin_matrix(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, K-1, K) specification C with ``(C z)_j = z_y - z_{t_j}``."""
    others = other_classes(y, num_classes)
    spec = torch.zeros(y.shape[0], num_classes - 1, num_classes, dtype=dtype, device=y.device)
    spec.scatter_(2, y.view(-1, 1, 1).expand(-1, num_classes - 1, 1), 1.0)
    spec.scatter_(2, others.unsqueeze(2), -1.0)
    return spec


def rounding_allowance(magnitude: Tensor) -> Tensor:
    """What a bound gives up so that floating-point rounding cannot make it unsound.

    A bound ``Σ_i a_i z_i + b`` computed in floating point is off by at most a small multiple of
    the machine epsilon times ``Σ_i |a_i z_i| + |b|`` (its *magnitude*) per rounding step. Every
    final bound subtracts ``ROUNDING_ULPS · eps_machine · magnitude`` (3e-5 relative in float32),
    far more than the accumulated error of the networks here; ``acert certify --check-float64``
    re-checks the certificates in float64. The allowance carries no gradient.
    """
    return (ROUNDING_ULPS * torch.finfo(magnitude.dtype).eps * magnitude).detach()
