"""What every bound gives up for floating-point rounding: the relative error of a sum of
products, the underflow floor, the final allowance and the input step that subtracts it
(docs/ARCHITECTURE.md, "Soundness")."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "ROUNDING_ULPS",
    "input_lower_bound",
    "rounding_allowance",
    "rounding_gamma",
    "underflow_floor",
]

ROUNDING_ULPS = 256
"""Smallest final rounding allowance, in machine epsilons per unit of bound magnitude; 0 turns
every rounding term off (the tests that compare bounds with exact hand computations)."""


def rounding_gamma(terms: int, dtype: torch.dtype) -> float:
    """Bound on the relative rounding error of a layer with sums of ``terms`` products.

    A float dot product of n terms is off by at most ``γ_n·Σ|terms|``, ``γ_n ≈ n·u`` (u = eps/2,
    the unit roundoff; Higham, "Accuracy and stability of numerical algorithms", §3.1), in
    whatever order the library sums. ``2·(terms + 16)·eps`` covers that error twice, once for
    the bound's own arithmetic and once for the model's forward pass (so a certificate also
    holds for the prediction the model computes in floating point, not only for the exact
    network), with room for the few elementwise roundings around a layer (ReLU, the input box,
    folded batch-norm parameters). 0 when :data:`ROUNDING_ULPS` is 0.
    """
    if ROUNDING_ULPS == 0:
        return 0.0
    return 2 * (terms + 16) * torch.finfo(dtype).eps


def underflow_floor(terms: int, dtype: torch.dtype) -> float:
    """Bound on the absolute rounding error of ``terms`` products that underflow.

    The relative model of :func:`rounding_gamma` fails below the normal range: a product whose
    exact value is subnormal is rounded to the subnormal grid, off by up to half the smallest
    subnormal η whatever its relative size (sums and differences in that range are exact).
    ``2·(terms + 16)·η`` covers that for the bound's arithmetic and the model's forward pass
    alike, as :func:`rounding_gamma` does for the relative part. 0 when :data:`ROUNDING_ULPS`
    is 0.
    """
    if ROUNDING_ULPS == 0:
        return 0.0
    info = torch.finfo(dtype)
    return 2 * (terms + 16) * info.tiny * info.eps


def rounding_allowance(magnitude: Tensor, terms: int = 0) -> Tensor:
    """What a final bound gives up so that floating-point rounding cannot make it unsound.

    A bound ``Σ_i a_i z_i + b`` of ``terms`` products computed in floating point is off by at
    most a multiple of the machine epsilon times ``Σ_i |a_i z_i| + |b|`` (its *magnitude*),
    plus the underflow of its products. The allowance is
    ``max(ROUNDING_ULPS, 2·(terms + 16))·eps·magnitude`` (:func:`rounding_gamma` for ``terms``
    products, at least 256 machine epsilons: 3e-5 relative in float32) plus
    :func:`underflow_floor` of ``terms``. It carries no gradient.
    """
    if ROUNDING_ULPS == 0:
        return torch.zeros_like(magnitude)
    factor = max(ROUNDING_ULPS, 2 * (terms + 16))
    relative = factor * torch.finfo(magnitude.dtype).eps * magnitude
    return (relative + underflow_floor(terms, magnitude.dtype)).detach()


def input_lower_bound(
    A: Tensor,
    bias: Tensor,
    bias_magnitude: Tensor,
    centre: Tensor,
    radius: Tensor,
    dot: Callable[[Tensor, Tensor], Tensor],
    terms: int,
) -> Tensor:
    """(Q, S) ``min A·x + bias`` over the box (centre, radius), less the rounding allowance of
    its magnitude ``|A|·(|c| + r) + Σ|bias terms|`` for sums of ``terms`` products.

    Args:
        A: (Q, S, ...) coefficients on the input; bias: (Q, S); bias_magnitude: (Q, S).
        centre, radius: (Q, ...) each query's input box (the same layout as A's tail).
        dot: ``(Q, S, ...) x (Q, ...) -> (Q, S)`` products for this layout.
        terms: elements of one input (the most products a dot sums, in any layout).
    """
    magnitude_A = A.abs()
    spread = dot(magnitude_A, radius)
    magnitude = dot(magnitude_A, centre.abs() + radius) + bias_magnitude
    lower = bias + dot(A, centre) - spread
    return lower - rounding_allowance(magnitude, terms)
