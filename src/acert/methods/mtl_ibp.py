"""MTL-IBP (De Palma et al. 2024, "Expressive losses for verified robustness via convex
combinations", ICLR).

``L = α·L_IBP(ε) + (1-α)·L_adv``: the robust CE of the IBP margins over the ε-ball and the CE at a
PGD point of the same ball, both at the scheduled ε_s (METHOD.md, "Baselines"). α = 1 is IBP
training with κ = 0; α = 0 is PGD training. During warm-up the regularisers of Shi et al. 2021
are added on the IBP pass, as De Palma et al. do.

Batch-norm (our choice, see :mod:`acert.methods.base`): the attack runs in eval mode, and both
terms use the clean batch's statistics, so the two terms bound the worst-case loss of the same
function from above and below (the reference code normalises with the adversarial batch's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from acert.bounds import clean_forward, input_box
from acert.methods.base import (
    Batch,
    LossTerms,
    Stateless,
    Step,
    TrainingAttack,
    adversarial_terms,
    clean_terms,
    ibp_pass,
    robust_cross_entropy,
    standard_phase_terms,
    with_warmup,
)
from acert.methods.warmup import WarmupRegularizer

__all__ = ["MTLIBP"]


@dataclass
class MTLIBP(Stateless):
    """``α·L_IBP + (1-α)·L_adv`` plus warm-up regularisers; L_std and the warm-up
    regularisers while ε_s = 0.

    Attributes:
        alpha: α, the weight of the IBP loss (``mtl_alpha``); the attack is skipped at α = 1.
        attack: the PGD settings.
        regularizer: the warm-up regularisers (Shi et al. 2021).
    """

    alpha: float = 0.5
    attack: TrainingAttack = field(default_factory=TrainingAttack)
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    name: str = "mtl-ibp"

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms:
        logits, stats = clean_forward(model, batch.x)
        if step.eps == 0:
            return standard_phase_terms(model, batch, logits, stats, step, self.regularizer)
        terms = clean_terms(logits, batch.y)
        bounds = ibp_pass(model, input_box(batch.x, step.eps), batch.y, stats)
        loss = loss_ibp = robust_cross_entropy(bounds.margins)
        terms.metrics.update(loss_rob=loss_ibp.item(), certified=bounds.certified)
        if self.alpha < 1:
            x_adv = self.attack(model, batch.x, batch.y, step.eps)
            loss_adv, adv_acc = adversarial_terms(model, x_adv, batch.y, stats)
            loss = self.alpha * loss_ibp + (1 - self.alpha) * loss_adv
            terms.metrics.update(loss_adv=loss_adv.item(), adv_acc=adv_acc)
        return with_warmup(
            LossTerms(loss, logits, terms.metrics), self.regularizer, model, bounds, stats, step
        )
