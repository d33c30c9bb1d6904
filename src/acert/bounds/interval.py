"""The interval value object and the perturbation set of docs/METHOD.md, "Threat model".

The input set is the ℓ∞ ball of radius ε around x intersected with the pixel domain [0, 1]:
``[max(x - ε, 0), min(x + ε, 1)]`` per pixel. ε is in pixel units and may differ per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from acert.foundation.errors import AcertError

__all__ = ["Interval", "as_eps", "input_box"]


@dataclass(frozen=True)
class Interval:
    """Elementwise bounds ``lower <= z <= upper``, stored in IBP's centre/radius form.

    Attributes:
        centre: (B, ...) midpoint.
        radius: (B, ...) half-width, non-negative.
    """

    centre: Tensor
    radius: Tensor

    @classmethod
    def from_bounds(cls, lower: Tensor, upper: Tensor) -> Interval:
        return cls((upper + lower) * 0.5, (upper - lower) * 0.5)

    @property
    def lower(self) -> Tensor:
        return self.centre - self.radius

    @property
    def upper(self) -> Tensor:
        return self.centre + self.radius

    @property
    def shape(self) -> torch.Size:
        return self.centre.shape

    def intersect(self, other: Interval) -> Interval:
        """The tighter of two sound intervals for the same quantity."""
        return Interval.from_bounds(
            torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper)
        )

    def index(self, rows: Tensor) -> Interval:
        """The intervals of the selected batch rows."""
        return Interval(self.centre[rows], self.radius[rows])


def as_eps(eps: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """ε as a (B,) tensor of ``like``'s dtype and device; rejects NaN and negative values.

    Args:
        eps: a number or a (B,) tensor, pixel units.
        batch: the batch size B.
        like: a tensor whose dtype and device the result takes.
    """
    eps_t = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(batch)
    if eps_t.shape != (batch,):
        raise AcertError(
            f"eps must be a number or a tensor of shape ({batch},), got shape {tuple(eps_t.shape)}"
        )
    if torch.isnan(eps_t).any() or (eps_t < 0).any():
        raise AcertError("eps must be >= 0 and not NaN; pass a radius in pixel units, e.g. 0.1")
    return eps_t


def input_box(x: Tensor, eps: float | Tensor) -> Interval:
    """The ℓ∞ ball of radius eps around x, clipped to the pixel domain [0, 1].

    Args:
        x: (B, C, H, W) or (B, D) inputs in [0, 1].
        eps: a number or (B,) per-sample radii, pixel units.
    """
    eps_t = as_eps(eps, x.shape[0], x).view(-1, *([1] * (x.dim() - 1)))
    return Interval.from_bounds((x - eps_t).clamp(0, 1), (x + eps_t).clamp(0, 1))
