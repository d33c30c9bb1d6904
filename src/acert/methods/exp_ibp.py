"""EXP-IBP (De Palma et al. 2024, "Expressive losses for verified robustness via convex
combinations", ICLR; docs/METHOD.md (M19)).

The convex combination is taken between the logarithms of the two losses:

    L_EXP(α) = L_adv^(1-α) · L_IBP^α = exp((1-α)·log L_adv + α·log L_IBP),

with ``L_adv = CE(f(x_adv), y)`` at a PGD point of the ε-ball and ``L_IBP`` the robust CE of the
IBP margins over the ball. α = 1 is the IBP robust loss, α = 0 PGD training. Computed in log
space; a loss that underflows to 0 is floored at the smallest normal float, so its logarithm,
and the gradient ``L_EXP·[(1-α)·∇L_adv/L_adv + α·∇L_IBP/L_IBP]``, stay finite.

Both losses are means over the whole global batch (:func:`global_mean`): the product of two
batch means is not a mean of per-sample terms, so on several processes each takes the same
loss as one process on the whole batch, and the averaged gradients are its gradients.

The PGD point, the batch-norm statistics and the warm-up regularisers are those of
:mod:`acert.methods.mtl_ibp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from acert.foundation.process_group import global_sum
from acert.foundation.ranges import between
from acert.foundation.settings import Settings, setting
from acert.methods.expressive import ExpressiveLoss
from acert.methods.registry import register_method

__all__ = ["EXPIBP", "EXPIBPSettings", "global_mean", "log_product", "robust_cross_entropies"]


def global_mean(values: Tensor) -> Tensor:
    """The mean of (B,) per-sample values over the global batch (all processes), differentiable."""
    totals = global_sum(torch.stack([values.sum(), values.new_tensor(float(values.numel()))]))
    return totals[0] / totals[1].detach()


def robust_cross_entropies(margin_lower: Tensor) -> Tensor:
    """(B,) ``log(1 + Σ_t exp(-lb_t))`` per sample: :func:`acert.methods.base.robust_cross_entropy`
    before its mean.

    Args:
        margin_lower: (B, K-1) lower bounds (or estimates) of ``f_y - f_t``.
    """
    return torch.logsumexp(F.pad(-margin_lower, (1, 0)), dim=1)


def log_product(first: Tensor, second: Tensor, weight: float) -> Tensor:
    """``first^(1-weight) · second^weight`` for positive scalars, computed in log space.

    Args:
        first: scalar, e.g. L_adv.
        second: scalar, e.g. L_IBP.
        weight: the exponent of ``second`` in [0, 1].
    """
    tiny = torch.finfo(first.dtype).tiny
    logs = (1 - weight) * first.clamp_min(tiny).log() + weight * second.clamp_min(tiny).log()
    return logs.exp()


@dataclass(frozen=True)
class EXPIBPSettings(Settings):
    """EXP-IBP's config key."""

    exp_alpha: float = setting(0.5, "α of EXP-IBP: the loss L_adv^(1-α) · L_IBP^α", between(0, 1))


@register_method("exp-ibp", knobs={"exp_alpha": "α"}, settings=EXPIBPSettings)
@dataclass
class EXPIBP(ExpressiveLoss):
    """``L_adv^(1-α) · L_IBP^α`` (docs/METHOD.md (M19)); α is ``exp_alpha``."""

    alpha_settings: ClassVar[type[Settings]] = EXPIBPSettings

    def combine(
        self, ibp_margins: Tensor, adv_logits: Tensor | None, y: Tensor, metrics: dict
    ) -> Tensor:
        loss_ibp = global_mean(robust_cross_entropies(ibp_margins))
        metrics["loss_rob"] = loss_ibp.item()
        if adv_logits is None:
            return loss_ibp
        loss_adv = global_mean(F.cross_entropy(adv_logits, y, reduction="none"))
        metrics["loss_adv"] = loss_adv.item()
        return log_product(loss_adv, loss_ibp, self.alpha)
