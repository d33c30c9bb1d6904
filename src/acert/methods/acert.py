"""ACERT: adaptive certified training (Nurlanov, Schmidt, Bernard; ECML-PKDD 2024).

Each sample is trained at its own certified radius instead of one fixed ε (METHOD.md,
"Training loss"): the IBP radius of the sample, found without gradients and capped at the
schedule's ε, sets the ball on which the robust loss is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds import BatchStats, clean_forward
from acert.methods.base import Batch, LossTerms, Stateless, Step, certified_objective
from acert.methods.warmup import WarmupRegularizer
from acert.radius import radius_search

__all__ = ["ACERT"]


@dataclass
class ACERT(Stateless):
    """The ACERT loss; κ moves the model along the accuracy–robustness trade-off.

    Attributes:
        kappa: weight κ of the clean loss in ``(1-κ)·L_rob + κ·L_std``.
        regularizer: the warm-up regularisers.
        search: radius search strategy (``"brent"`` or ``"bisection"``).
        max_iter, xtol, rtol, ftol: the cheap training search (10, 1e-6, 1e-4, 1e-5).
        min_warmup_eps: floor of the radii during warm-up (1e-6).
    """

    kappa: float = 0.0
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    search: str = "brent"
    max_iter: int = 10
    xtol: float = 1e-6
    rtol: float = 1e-4
    ftol: float = 1e-5
    min_warmup_eps: float = 1e-6
    name: str = "acert"

    def adaptive_radii(
        self, model: nn.Sequential, batch: Batch, step: Step, logits: Tensor, stats: BatchStats
    ) -> tuple[Tensor, float]:
        """(B,) IBP certified radii capped at ε_s, 0 if misclassified (METHOD.md step 3)."""
        with torch.no_grad():
            result = radius_search(
                model,
                batch.x,
                batch.y,
                step.eps,
                "ibp",
                search=self.search,
                xtol=self.xtol,
                rtol=self.rtol,
                ftol=self.ftol,
                max_iter=self.max_iter,
                stats=stats,
                logits=logits.detach(),
            )
        radii = result.radius.clamp(min=self.min_warmup_eps) if step.warmup else result.radius
        return radii, result.mean_evaluations

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms:
        """METHOD.md, "Training loss" steps 1-5."""
        logits, stats = clean_forward(model, batch.x)
        if step.eps == 0:
            return LossTerms(F.cross_entropy(logits, batch.y), logits)
        radii, evaluations = self.adaptive_radii(model, batch, step, logits, stats)
        terms = certified_objective(
            model, batch, radii, step, logits, stats, self.kappa, self.regularizer
        )
        terms.metrics["radius_evals"] = evaluations
        return terms
