"""IBP training (Gowal et al. 2019) with the fast warm-up of Shi et al. 2021.

Exactly the ACERT objective of docs/METHOD.md, "Training loss" (``(1-κ)·L_rob + κ·L_std`` plus the
warm-up regularisers) with every sample at the scheduled training ε_s instead of its adaptive
radius; the trade-off curve comes from several ``eps_train`` (docs/METHOD.md, "Baselines").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from acert.bounds import BatchStats, as_eps, clean_forward
from acert.foundation.ranges import between
from acert.foundation.settings import Settings, setting
from acert.methods.base import (
    Batch,
    IBPPass,
    LossTerms,
    Stateless,
    Step,
    certified_objective,
    certified_terms,
    standard_phase_terms,
)
from acert.methods.registry import register_method
from acert.methods.warmup import WarmupRegularizer

__all__ = ["IBP", "KappaSettings"]


@dataclass(frozen=True)
class KappaSettings(Settings):
    """The clean loss's weight κ of the certified objective: the config key of IBP, and of
    CROWN-IBP and ACERT, whose records inherit this one."""

    kappa: float = setting(
        0.0,
        "weight κ of the clean loss in (1-κ)·L_rob + κ·L_std, the trade-off knob of ACERT, "
        "IBP and CROWN-IBP (docs/METHOD.md, Step 5)",
        between(0, 1),
    )


@register_method("ibp", knobs={"kappa": "κ"}, settings=KappaSettings)
@dataclass
class IBP(Stateless):
    """``(1-κ)·L_rob(ε_s) + κ·L_std`` plus warm-up regularisers; L_std and them while ε_s = 0.

    Attributes:
        kappa: weight κ of the clean loss.
        regularizer: the warm-up regularisers (Shi et al. 2021).
    """

    kappa: float = 0.0
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    owns_kappa: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: Any) -> IBP:
        settings = KappaSettings.read(config)
        return cls(kappa=settings.kappa, regularizer=WarmupRegularizer.from_config(config))

    def loss(self, model: nn.Module, batch: Batch, step: Step) -> LossTerms:
        logits, stats = clean_forward(model, batch.x)
        if step.eps == 0:
            return standard_phase_terms(model, batch, logits, stats, step, self.regularizer)
        eps = torch.full(batch.y.shape, step.eps, dtype=batch.x.dtype, device=batch.x.device)
        return certified_objective(
            model, batch, eps, step, logits, stats, self.kappa, self.regularizer
        )

    def robust_terms(
        self,
        model: nn.Module,
        batch: Batch,
        step: Step,
        logits: Tensor,
        stats: BatchStats,
        eps: float | Tensor,
    ) -> tuple[LossTerms, IBPPass]:
        """``(1-κ)·L_rob(ε) + κ·L_std`` and its IBP pass (at per-sample radii: ACERT's loss)."""
        radii = as_eps(eps, batch.x.shape[0], batch.x)
        return certified_terms(model, batch, radii, logits, stats, self.kappa)
