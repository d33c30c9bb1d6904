"""SABR (Müller et al. 2023, "Certified training: small boxes are all you need", ICLR).

Instead of the whole ε-ball, IBP propagates a small box of radius τ = λ·ε around an adversarial
point, shifted to lie inside the ball; λ moves the trade-off (docs/METHOD.md, "Baselines"):

1. x_adv by PGD in the clipped ε-ball (eval mode, as for :mod:`acert.methods.pgd`);
2. the box of :func:`sabr_box` around it;
3. ``L = CE([0, -lb], 0)`` on the box's IBP margins, plus during warm-up the regularisers of
   Shi et al. 2021 on the same IBP pass (the reference implementation regularises its
   propagated box too). No κ mix: SABR's loss is the robust CE alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from acert.bounds import BatchStats, Interval, as_eps, input_box
from acert.foundation.ranges import between
from acert.foundation.settings import Settings, setting
from acert.methods.base import (
    Batch,
    IBPPass,
    LossTerms,
    Stateless,
    Step,
    TrainingAttack,
    clean_terms,
    fixed_eps_loss,
    ibp_pass,
    mean_radius,
    robust_cross_entropy,
)
from acert.methods.registry import register_method
from acert.methods.warmup import WarmupRegularizer

__all__ = ["SABR", "SABRSettings", "sabr_box"]


def sabr_box(x: Tensor, x_adv: Tensor, eps: float | Tensor, lam: float) -> Interval:
    """The box of half-width ``τ = λ·ε`` around x_adv, shifted into the clipped ε-ball.

    With the ball ``[lo, hi] = [max(x-ε, 0), min(x+ε, 1)]``, the centre is x_adv clamped to
    ``[lo+τ, hi-τ]`` and the box is ``[centre-τ, centre+τ] ∩ [lo, hi]``. As in the reference
    implementation of Müller et al., the shift uses the ball already clipped to [0, 1], so the
    box keeps its full width 2τ wherever the clipped ball is that wide; where it is narrower
    (near a pixel bound, or λ = 1) the box is the whole clipped ball.

    Args:
        x: (B, ...) clean inputs in [0, 1].
        x_adv: (B, ...) adversarial points in the clipped ε-ball.
        eps: ball radius, a number or (B,) per sample, pixel units.
        lam: λ in [0, 1].

    Returns:
        (B, ...) the box, inside the clipped ε-ball, half-width <= λ·ε.
    """
    ball = input_box(x, eps)
    tau = lam * as_eps(eps, x.shape[0], x).view(-1, *([1] * (x.dim() - 1)))
    lo, hi = ball.lower, ball.upper
    centre = x_adv.maximum(lo + tau).minimum(hi - tau)
    return Interval.from_bounds((centre - tau).maximum(lo), (centre + tau).minimum(hi))


@dataclass(frozen=True)
class SABRSettings(Settings):
    """SABR's config key (STAPS's record inherits it)."""

    sabr_lambda: float = setting(
        0.4,
        "λ of SABR and STAPS: the radius of the propagated box as a fraction of ε",
        between(0, 1),
    )


@register_method("sabr", knobs={"sabr_lambda": "λ"}, settings=SABRSettings)
@dataclass
class SABR(Stateless):
    """Robust CE of the IBP margins of a small adversarial box; L_std and the warm-up
    regularisers while ε_s = 0.

    Attributes:
        lam: λ, the box radius as a fraction of ε (``sabr_lambda``).
        attack: the PGD settings that find the box centre.
        regularizer: the warm-up regularisers (Shi et al. 2021).
    """

    lam: float = 0.4
    attack: TrainingAttack = field(default_factory=TrainingAttack)
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    owns_kappa: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Any) -> SABR:
        return cls(
            lam=SABRSettings.read(config).sabr_lambda,
            attack=TrainingAttack.from_config(config),
            regularizer=WarmupRegularizer.from_config(config),
        )

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
        """The robust CE of the small box in the ε-ball, before the warm-up regularisers."""
        terms = clean_terms(logits, batch.y)
        x_adv = self.attack(model, batch.x, batch.y, eps)
        bounds = ibp_pass(model, sabr_box(batch.x, x_adv, eps, self.lam), batch.y, stats)
        loss_rob = robust_cross_entropy(bounds.margins)
        terms.metrics.update(
            loss_rob=loss_rob.item(),
            box_radius=self.lam * mean_radius(eps),
            box_certified=bounds.certified,
        )
        return LossTerms(loss_rob, logits, terms.metrics), bounds
