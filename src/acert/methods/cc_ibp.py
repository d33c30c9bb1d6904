"""CC-IBP (De Palma et al. 2024, "Expressive losses for verified robustness via convex
combinations", ICLR; docs/METHOD.md (M18)).

The convex combination is taken between margins, not losses: with the margins
``m_adv = f_y(x_adv) - f_t(x_adv)`` at a PGD point of the ε-ball and ``m_IBP`` the IBP lower
bounds of the same margins over the ball (both (B, K-1), t != y),

    L_CC(α) = CE(-[(1-α)·z_adv + α·z_IBP], y) = mean log(1 + Σ_t exp(-[(1-α)·m_adv + α·m_IBP]_t)),

the robust CE of the combined margins (``z = -m`` in the paper's logit-difference notation,
``z_t = f_t - f_y``). α = 1 is the IBP robust loss; α = 0 is exactly ``CE(f(x_adv), y)``, PGD
training. Because the margins of the network at x_adv lie above their IBP lower bounds, the
loss moves monotonically from the adversarial loss (a lower bound of the worst-case loss) to
the IBP loss (an upper bound) as α grows: the "expressivity" of the paper.

The PGD point, the batch-norm statistics and the warm-up regularisers are those of
:mod:`acert.methods.mtl_ibp` (attack in eval mode; both terms with the clean batch's statistics;
Shi et al. 2021 regularisers on the IBP pass during warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from acert.bounds.spec import other_classes
from acert.foundation.ranges import between
from acert.foundation.settings import Settings, setting
from acert.methods.base import robust_cross_entropy
from acert.methods.expressive import ExpressiveLoss
from acert.methods.registry import register_method

__all__ = ["CCIBP", "CCIBPSettings", "logit_margins"]


def logit_margins(logits: Tensor, y: Tensor) -> Tensor:
    """(B, K-1) ``f_y - f_t`` for t != y in increasing order, the order of the IBP margins.

    Args:
        logits: (B, K) logits.
        y: (B,) labels.
    """
    others = logits.gather(1, other_classes(y, logits.shape[1]))
    return logits.gather(1, y.unsqueeze(1)) - others


@dataclass(frozen=True)
class CCIBPSettings(Settings):
    """CC-IBP's config key."""

    cc_alpha: float = setting(
        0.5, "α of CC-IBP: the robust CE of the margins (1-α)·m_adv + α·m_IBP", between(0, 1)
    )


@register_method("cc-ibp", knobs={"cc_alpha": "α"}, settings=CCIBPSettings)
@dataclass
class CCIBP(ExpressiveLoss):
    """Robust CE of ``(1-α)·m_adv + α·m_IBP`` (docs/METHOD.md (M18)); α is ``cc_alpha``."""

    alpha_settings: ClassVar[type[Settings]] = CCIBPSettings

    def combine(
        self, ibp_margins: Tensor, adv_logits: Tensor | None, y: Tensor, metrics: dict
    ) -> Tensor:
        metrics["loss_rob"] = robust_cross_entropy(ibp_margins).item()
        margins = ibp_margins
        if adv_logits is not None:
            adv_margins = logit_margins(adv_logits, y)
            margins = self.alpha * ibp_margins + (1 - self.alpha) * adv_margins
            metrics["loss_adv"] = robust_cross_entropy(adv_margins).item()
        return robust_cross_entropy(margins)
