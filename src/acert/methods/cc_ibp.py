"""CC-IBP (De Palma et al. 2024, "Expressive losses for verified robustness via convex
combinations", ICLR; METHOD.md (M18)).

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

from dataclasses import dataclass, field

from torch import Tensor, nn

from acert.bounds import clean_forward, input_box
from acert.bounds.layers import forward_with_stats
from acert.bounds.spec import other_classes
from acert.methods.base import (
    Batch,
    LossTerms,
    Stateless,
    Step,
    TrainingAttack,
    clean_terms,
    ibp_pass,
    robust_cross_entropy,
    standard_phase_terms,
    with_warmup,
)
from acert.methods.warmup import WarmupRegularizer

__all__ = ["CCIBP", "logit_margins"]


def logit_margins(logits: Tensor, y: Tensor) -> Tensor:
    """(B, K-1) ``f_y - f_t`` for t != y in increasing order, the order of the IBP margins.

    Args:
        logits: (B, K) logits.
        y: (B,) labels.
    """
    others = logits.gather(1, other_classes(y, logits.shape[1]))
    return logits.gather(1, y.unsqueeze(1)) - others


@dataclass
class CCIBP(Stateless):
    """Robust CE of ``(1-α)·m_adv + α·m_IBP`` plus warm-up regularisers; L_std and the warm-up
    regularisers while ε_s = 0.

    Attributes:
        alpha: α, the weight of the IBP margins (``cc_alpha``); the attack is skipped at α = 1.
        attack: the PGD settings.
        regularizer: the warm-up regularisers (Shi et al. 2021).
    """

    alpha: float = 0.5
    attack: TrainingAttack = field(default_factory=TrainingAttack)
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    name: str = "cc-ibp"

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms:
        logits, stats = clean_forward(model, batch.x)
        if step.eps == 0:
            return standard_phase_terms(model, batch, logits, stats, step, self.regularizer)
        terms = clean_terms(logits, batch.y)
        bounds = ibp_pass(model, input_box(batch.x, step.eps), batch.y, stats)
        margins = bounds.margins
        terms.metrics.update(
            loss_rob=robust_cross_entropy(bounds.margins).item(), certified=bounds.certified
        )
        if self.alpha < 1:
            x_adv = self.attack(model, batch.x, batch.y, step.eps)
            adv_logits = forward_with_stats(model, x_adv, stats)
            adv_margins = logit_margins(adv_logits, batch.y)
            margins = self.alpha * bounds.margins + (1 - self.alpha) * adv_margins
            terms.metrics.update(
                loss_adv=robust_cross_entropy(adv_margins).item(),
                adv_acc=(adv_logits.argmax(1) == batch.y).float().mean().item(),
            )
        loss = robust_cross_entropy(margins)
        return with_warmup(
            LossTerms(loss, logits, terms.metrics), self.regularizer, model, bounds, stats, step
        )
