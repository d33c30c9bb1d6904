"""CROWN-IBP training (Zhang et al. 2020, "Towards stable and efficient training of verifiably
robust neural networks").

The margins' lower bound mixes the two bounds, ``lb = β·lb_CROWN-IBP + (1-β)·lb_IBP``, and the
loss mixes the clean and the robust CE with ``κ``; both weights move linearly with the ramp's
progress ``ε_s/ε_max`` as in the reference code: β from ``beta_start`` (1, CROWN-IBP alone) to
``beta_end`` (0, IBP alone), κ from ``kappa_start`` (1) to ``kappa`` (the trade-off knob).
Training thus starts on the tighter CROWN-IBP bound and ends on IBP, and once ε_s = ε_max with
β = 0 the backward pass is skipped. The warm-up regularisers of Shi et al. 2021 act on the IBP
pass, as for IBP (docs/METHOD.md, "Baselines").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from acert.bounds import BatchStats, input_box
from acert.bounds.crown import crown_margins
from acert.methods.base import (
    Batch,
    IBPPass,
    LossTerms,
    Stateless,
    Step,
    fixed_eps_loss,
    ibp_pass,
    mixed_objective,
    robust_cross_entropy,
)
from acert.methods.ibp import KappaSettings
from acert.methods.registry import register_method
from acert.methods.warmup import WarmupRegularizer

__all__ = ["CROWNIBP"]


@register_method("crown-ibp", knobs={"kappa": "κ"}, settings=KappaSettings)
@dataclass
class CROWNIBP(Stateless):
    """``(1-κ)·L_rob(β·lb_CROWN-IBP + (1-β)·lb_IBP) + κ·L_std`` plus warm-up regularisers.

    Attributes:
        kappa: weight κ of the clean loss once ε_s = ε_max.
        regularizer: the warm-up regularisers (Shi et al. 2021).
        beta_start: β, the weight of the CROWN-IBP bound, at ε_s = 0.
        beta_end: β at ε_s = ε_max.
        kappa_start: κ at ε_s = 0.
    """

    kappa: float = 0.0
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    beta_start: float = 1.0
    beta_end: float = 0.0
    kappa_start: float = 1.0
    owns_kappa: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: Any) -> CROWNIBP:
        settings = KappaSettings.read(config)
        return cls(kappa=settings.kappa, regularizer=WarmupRegularizer.from_config(config))

    def beta(self, step: Step) -> float:
        """Weight of the CROWN-IBP bound, linear in the ramp's progress ``ε_s/ε_max``."""
        return self.beta_start + (self.beta_end - self.beta_start) * step.ramp_fraction

    def kappa_at(self, step: Step) -> float:
        """Weight of the clean loss, linear in the ramp's progress ``ε_s/ε_max``."""
        return self.kappa_start + (self.kappa - self.kappa_start) * step.ramp_fraction

    def margins(
        self,
        model: nn.Module,
        batch: Batch,
        eps: float | Tensor,
        stats: BatchStats,
        beta: float,
    ) -> tuple[Tensor, IBPPass]:
        """(B, K-1) mixed lower bounds of the margins over the ε-ball (ε a number or (B,) per
        sample), and the IBP pass.

        The CROWN-IBP backward pass is skipped when β = 0 (it would get weight 0).
        """
        box = input_box(batch.x, eps)
        bounds = ibp_pass(model, box, batch.y, stats)
        if beta <= 0:
            return bounds.margins, bounds
        crown = crown_margins(model, box, batch.y, stats, intermediate="ibp", sound=False)
        return beta * crown + (1 - beta) * bounds.margins, bounds

    def loss(self, model: nn.Module, batch: Batch, step: Step) -> LossTerms:
        return fixed_eps_loss(self, model, batch, step)

    def robust_terms(
        self,
        model: nn.Module,
        batch: Batch,
        step: Step,
        logits: Tensor,
        stats: BatchStats,
        eps: float | Tensor,
    ) -> tuple[LossTerms, IBPPass]:
        """The loss over the ε-ball before the warm-up regularisers, and the IBP pass; β and κ
        follow the schedule's ``ε_s/ε_max`` whatever ``eps`` is."""
        beta, kappa = self.beta(step), self.kappa_at(step)
        margins, bounds = self.margins(model, batch, eps, stats, beta)
        terms = mixed_objective(robust_cross_entropy(margins), logits, batch.y, kappa)
        terms.metrics.update(
            beta=beta, kappa=kappa, certified=(margins.min(1).values > 0).float().mean().item()
        )
        return terms, bounds
