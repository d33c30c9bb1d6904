"""Warm-up regularisers of Shi et al. 2021, "Fast certified robust training"
(docs/METHOD.md, "Warm-up regularisers and initialisation").

Both act on the IBP interval [l, u] of every layer that feeds a ReLU, with centre c = (u+l)/2:

- tightness: ``L_tight = mean_layers relu(τ - T0/T) / τ`` with T the layer's mean half-width and
  T0 the mean half-width of the input box as the first affine layer sees it (after Normalize);
- ReLU balance: with active units ``l > 0`` and inactive ``u < 0``, the ratio of the mean of
  ``c·[active]`` to minus the mean of ``c·[inactive]`` (means over all units, as Shi et al.
  compute them, which equals the ratio of the sums) and the ratio of their summed squared
  deviations from mean(c); each ratio r is folded to ``min(r, 1/r)`` and
  ``L_relu = mean_layers (relu(τ - r_mean) + relu(τ - r_var)) / τ``.
  A layer with no active or no inactive unit gives r = 0 (the largest penalty); one with
  neither (all unstable) contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from acert.bounds import BatchStats, Interval
from acert.bounds import ibp as ibp_rules
from acert.bounds.tracing import first_layer
from acert.foundation.process_group import global_sum
from acert.models import Normalize

__all__ = ["WarmupRegularizer", "relu_balance_loss", "tightness_loss"]


def _sum(t: Tensor) -> Tensor:
    """Sum over the whole global batch (all processes of a distributed run)."""
    return global_sum(t.sum())


def _mean(t: Tensor) -> Tensor:
    """Mean over the whole global batch (all processes of a distributed run)."""
    totals = global_sum(torch.stack([t.sum(), t.new_tensor(float(t.numel()))]))
    return totals[0] / totals[1]


def tightness_loss(input_box: Interval, preactivations: list[Interval], tau: float = 0.5) -> Tensor:
    """Mean over ReLU layers of ``relu(τ - T0/T) / τ``."""
    t0 = _mean(input_box.radius)
    terms = [
        torch.relu(tau - t0 / _mean(pre.radius).clamp(min=1e-12)) / tau for pre in preactivations
    ]
    return torch.stack(terms).mean()


def _folded_ratio(a: Tensor, b: Tensor) -> Tensor:
    """``min(a/b, b/a)`` for a, b >= 0, without the infinities of a division by zero."""
    return torch.minimum(a, b) / torch.maximum(a, b).clamp(min=1e-12)


def relu_balance_loss(preactivations: list[Interval], tau: float = 0.5) -> Tensor:
    """Mean over ReLU layers of ``(relu(τ - r_mean) + relu(τ - r_var)) / τ``."""
    terms = []
    for pre in preactivations:
        lower, upper, centre = pre.lower, pre.upper, pre.centre
        active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
        if _sum(active) + _sum(inactive) == 0:
            continue
        deviation = (centre - _mean(centre)) ** 2
        r_mean = _folded_ratio(_sum(centre * active), -_sum(centre * inactive))
        r_var = _folded_ratio(_sum(deviation * active), _sum(deviation * inactive))
        terms.append((torch.relu(tau - r_mean) + torch.relu(tau - r_var)) / tau)
    if not terms:
        return preactivations[0].centre.new_zeros(())
    return torch.stack(terms).mean()


@dataclass(frozen=True)
class WarmupRegularizer:
    """``λ_tight·L_tight + λ_relu·L_relu`` on one IBP pass's pre-activation intervals.

    Attributes:
        lambda_tight: weight of the tightness term (0.5; TinyImageNet 0.2).
        lambda_relu: weight of the ReLU balance term (0.5; TinyImageNet 0.2).
        tau: the tolerance τ (0.5).
    """

    lambda_tight: float = 0.5
    lambda_relu: float = 0.5
    tau: float = 0.5

    @classmethod
    def from_config(cls, config: Any) -> WarmupRegularizer:
        """The config's ``lambda_tight`` and ``lambda_relu``, these defaults where it leaves
        them unset (docs/METHOD.md)."""
        tight = cls.lambda_tight if config.lambda_tight is None else config.lambda_tight
        relu = cls.lambda_relu if config.lambda_relu is None else config.lambda_relu
        return cls(tight, relu)

    @property
    def active(self) -> bool:
        """False when both weights are 0 (the terms need not be computed)."""
        return self.lambda_tight != 0 or self.lambda_relu != 0

    def __call__(
        self,
        model: nn.Module,
        box: Interval,
        preactivations: list[Interval],
        stats: BatchStats | None,
    ) -> Tensor:
        if not preactivations or not self.active:
            return box.centre.new_zeros(())
        seen = box
        first = first_layer(model)
        if isinstance(first, Normalize):
            seen = ibp_rules.RULES[Normalize](first, stats, False)(box)
        return self.lambda_tight * tightness_loss(seen, preactivations, self.tau) + (
            self.lambda_relu * relu_balance_loss(preactivations, self.tau)
        )
