"""PGD adversarial training (Madry et al. 2018, "Towards deep learning models resistant to
adversarial attacks"): the empirically robust end of the trade-off, with no certificate.

``L = CE(f(x_adv), y)`` with x_adv found by PGD in the clipped ε-ball at the scheduled ε_s
(docs/METHOD.md, "Baselines"). Batch-norm (our choice, see :mod:`acert.methods.base`): the attack
runs in eval mode, so adversarial batches never enter the running statistics; the loss is then taken
in train mode with the clean batch's statistics, set by the clean pass that also gives the training
accuracy. Madry et al. normalise the adversarial batch with its own statistics instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from acert.bounds import clean_forward
from acert.methods.base import (
    Batch,
    LossTerms,
    Stateless,
    Step,
    TrainingAttack,
    adversarial_terms,
    clean_terms,
)
from acert.methods.registry import register_method

__all__ = ["PGDTraining"]


@register_method("pgd")
@dataclass
class PGDTraining(Stateless):
    """``CE(f(x_adv), y)``; clean CE while ε_s = 0.

    Attributes:
        attack: the PGD settings (``pgd_steps``, ``pgd_step_size``, ``pgd_restarts``).
    """

    attack: TrainingAttack = field(default_factory=TrainingAttack)

    @classmethod
    def from_config(cls, config: Any) -> PGDTraining:
        return cls(attack=TrainingAttack.from_config(config))

    def loss(self, model: nn.Module, batch: Batch, step: Step) -> LossTerms:
        logits, stats = clean_forward(model, batch.x)
        terms = clean_terms(logits, batch.y)
        if step.eps == 0:
            return terms
        x_adv = self.attack(model, batch.x, batch.y, step.eps)
        loss_adv, adv_acc = adversarial_terms(model, x_adv, batch.y, stats)
        terms.metrics.update(loss_adv=loss_adv.item(), adv_acc=adv_acc)
        return LossTerms(loss_adv, logits, terms.metrics)
