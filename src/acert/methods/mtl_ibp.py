"""MTL-IBP (De Palma et al. 2024, "Expressive losses for verified robustness via convex
combinations", ICLR).

``L = α·L_IBP(ε) + (1-α)·L_adv``: the robust CE of the IBP margins over the ε-ball and the CE at a
PGD point of the same ball, both at the scheduled ε_s (docs/METHOD.md, "Baselines"). α = 1 is IBP
training with κ = 0; α = 0 is PGD training. During warm-up the regularisers of Shi et al. 2021
are added on the IBP pass, as De Palma et al. do.

The attack, the batch-norm statistics and the regularisers: :mod:`acert.methods.expressive`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from acert.foundation.ranges import between
from acert.foundation.settings import Settings, setting
from acert.methods.base import robust_cross_entropy
from acert.methods.expressive import ExpressiveLoss
from acert.methods.registry import register_method

__all__ = ["MTLIBP", "MTLIBPSettings"]


@dataclass(frozen=True)
class MTLIBPSettings(Settings):
    """MTL-IBP's config key."""

    mtl_alpha: float = setting(0.5, "α of MTL-IBP: the loss α·L_IBP + (1-α)·L_adv", between(0, 1))


@register_method("mtl-ibp", knobs={"mtl_alpha": "α"}, settings=MTLIBPSettings)
@dataclass
class MTLIBP(ExpressiveLoss):
    """``α·L_IBP + (1-α)·L_adv`` (docs/METHOD.md (M17)); α is ``mtl_alpha``."""

    alpha_settings: ClassVar[type[Settings]] = MTLIBPSettings

    def combine(
        self, ibp_margins: Tensor, adv_logits: Tensor | None, y: Tensor, metrics: dict
    ) -> Tensor:
        loss_ibp = robust_cross_entropy(ibp_margins)
        metrics["loss_rob"] = loss_ibp.item()
        if adv_logits is None:
            return loss_ibp
        loss_adv = F.cross_entropy(adv_logits, y)
        metrics["loss_adv"] = loss_adv.item()
        return self.alpha * loss_ibp + (1 - self.alpha) * loss_adv
