"""What the expressive losses share (De Palma et al. 2024, "Expressive losses for verified
robustness via convex combinations", ICLR; docs/METHOD.md (M17)-(M19)).

Each combines two views of the same ε-ball with one coefficient α: the IBP margins over the
ball and the network's margins at a PGD point of it. The IBP pass, the attack (skipped at
α = 1), the clean batch's batch-norm statistics for both, and the warm-up regularisers on the
IBP pass are the same for all three; only how the two are combined differs
(:meth:`ExpressiveLoss.combine`): MTL-IBP the losses, CC-IBP the margins, EXP-IBP the logarithms
of the losses.

Batch-norm (our choice, see :mod:`acert.methods.base`): the attack runs in eval mode, and both
terms use the clean batch's statistics, so the two terms bound the worst-case loss of the same
function from above and below (the reference code normalises with the adversarial batch's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from acert.bounds import BatchStats, input_box
from acert.bounds.clean_pass import forward_with_stats
from acert.foundation.settings import Settings
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
)
from acert.methods.warmup import WarmupRegularizer

__all__ = ["ExpressiveLoss"]


@dataclass
class ExpressiveLoss(Stateless):
    """The loss of the IBP margins and of the margins at a PGD point, combined by α; L_std and
    the warm-up regularisers while ε_s = 0.

    Attributes:
        alpha: α, the weight of the IBP side (1: IBP alone, the attack is skipped; 0: the
            adversarial side alone).
        attack: the PGD settings.
        regularizer: the warm-up regularisers (Shi et al. 2021).
    """

    alpha: float = 0.5
    attack: TrainingAttack = field(default_factory=TrainingAttack)
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    alpha_settings: ClassVar[type[Settings]]
    """The method's settings record: one key, its α (``mtl_alpha``, ...)."""
    owns_kappa: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Any) -> ExpressiveLoss:
        return cls(
            alpha=dataclasses.astuple(cls.alpha_settings.read(config))[0],
            attack=TrainingAttack.from_config(config),
            regularizer=WarmupRegularizer.from_config(config),
        )

    def combine(
        self, ibp_margins: Tensor, adv_logits: Tensor | None, y: Tensor, metrics: dict
    ) -> Tensor:
        """The loss from the (B, K-1) IBP margin bounds and the (B, K) logits at the PGD points
        (None at α = 1); records ``loss_rob`` (and ``loss_adv``) in ``metrics``."""
        raise NotImplementedError

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
        """The combined loss over the ε-ball before the warm-up regularisers, and the IBP pass."""
        terms = clean_terms(logits, batch.y)
        bounds = ibp_pass(model, input_box(batch.x, eps), batch.y, stats)
        adv_logits = None
        if self.alpha < 1:
            x_adv = self.attack(model, batch.x, batch.y, eps)
            adv_logits = forward_with_stats(model, x_adv, stats)
            terms.metrics["adv_acc"] = (adv_logits.argmax(1) == batch.y).float().mean().item()
        loss = self.combine(bounds.margins, adv_logits, batch.y, terms.metrics)
        terms.metrics["certified"] = bounds.certified
        return LossTerms(loss, logits, terms.metrics), bounds
