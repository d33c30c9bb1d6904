"""CROWN-IBP training (Zhang et al. 2020, "Towards stable and efficient training of verifiably
robust neural networks").

The margins' lower bound mixes the two bounds, ``lb = β·lb_IBP + (1-β)·lb_CROWN-IBP``, with β
moving from ``beta_start`` (1) to ``beta_end`` (0) as ε_s ramps to ε_max (their "1 → 0"
schedule; here β follows ``ε_s/ε_max``). The loss is METHOD.md's objective on these margins,
``(1-κ)·CE([0, -lb], 0) + κ·L_std`` with a fixed κ (Zhang et al. ramp κ as well), plus the
warm-up regularisers of Shi et al. 2021 on the IBP pass, as for IBP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from acert.bounds import BatchStats, clean_forward, input_box
from acert.bounds.crown import crown_margins
from acert.methods.base import (
    Batch,
    IBPPass,
    LossTerms,
    Stateless,
    Step,
    clean_terms,
    ibp_pass,
    mixed_objective,
    robust_cross_entropy,
    with_warmup,
)
from acert.methods.warmup import WarmupRegularizer

__all__ = ["CROWNIBP"]


@dataclass
class CROWNIBP(Stateless):
    """``(1-κ)·L_rob(β·lb_IBP + (1-β)·lb_CROWN-IBP) + κ·L_std`` plus warm-up regularisers.

    Attributes:
        kappa: weight κ of the clean loss.
        regularizer: the warm-up regularisers (Shi et al. 2021).
        beta_start: β at ε_s = 0.
        beta_end: β at ε_s = ε_max.
    """

    kappa: float = 0.0
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    beta_start: float = 1.0
    beta_end: float = 0.0
    name: str = "crown-ibp"

    def beta(self, step: Step) -> float:
        """Weight of the IBP bound, linear in the ramp's progress ``ε_s/ε_max``."""
        return self.beta_start + (self.beta_end - self.beta_start) * step.ramp_fraction

    def margins(
        self, model: nn.Sequential, batch: Batch, eps: float, stats: BatchStats, beta: float
    ) -> tuple[Tensor, IBPPass]:
        """(B, K-1) mixed lower bounds of the margins over the ε-ball, and the IBP pass.

        The CROWN-IBP backward pass is skipped when β = 1 (it would get weight 0).
        """
        box = input_box(batch.x, eps)
        bounds = ibp_pass(model, box, batch.y, stats)
        if beta >= 1:
            return bounds.margins, bounds
        crown = crown_margins(model, box, batch.y, stats, intermediate="ibp")
        return beta * bounds.margins + (1 - beta) * crown, bounds

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms:
        logits, stats = clean_forward(model, batch.x)
        if step.eps == 0:
            return clean_terms(logits, batch.y)
        beta = self.beta(step)
        margins, bounds = self.margins(model, batch, step.eps, stats, beta)
        terms = mixed_objective(robust_cross_entropy(margins), logits, batch.y, self.kappa)
        terms = with_warmup(terms, self.regularizer, model, bounds, stats, step)
        terms.metrics.update(beta=beta, certified=(margins.min(1).values > 0).float().mean().item())
        return terms
