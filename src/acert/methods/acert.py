"""ACERT: adaptive certified training (Nurlanov, Schmidt, Bernard; ECML-PKDD 2024).

Each sample is trained at its own certified radius instead of one fixed ε (docs/METHOD.md,
"Training loss"): the IBP radius of the sample, found without gradients and capped at the
schedule's ε, sets the ball on which the robust loss is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from acert.bounds import BatchStats, clean_forward
from acert.foundation.ranges import OneOf, at_least
from acert.foundation.settings import setting
from acert.methods.base import (
    MIN_WARMUP_EPS,
    Batch,
    LossTerms,
    Step,
    certified_objective,
    mixed_objective,
    robust_cross_entropy,
    standard_phase_terms,
    with_warmup,
)
from acert.methods.cap_first import CAP_CHECKS, cap_first_pass
from acert.methods.ibp import KappaSettings
from acert.methods.registry import register_method
from acert.methods.warmup import WarmupRegularizer
from acert.radius import TRAINING_SEARCH, KnownBatch, SearchSettings, radius_search
from acert.radius.settings import STRATEGY, check_settings

__all__ = ["ACERT", "ACERTSettings", "RadiusMemory", "adaptive_radii", "training_search"]


@dataclass(frozen=True)
class ACERTSettings(KappaSettings):
    """ACERT's config keys: κ and the training radius search (``adaptive-<base>`` inherits
    them)."""

    radius_search: str = setting(
        "brent", "search of ACERT's training radii (docs/METHOD.md, Step 3)", STRATEGY
    )
    radius_max_iter: int = setting(
        10,
        "evaluations of ACERT's training radius search after the one at the cap",
        at_least(1, whole=True),
    )
    radius_rtol: float = setting(
        1e-4,
        "relative tolerance of ACERT's training radius search: a sample stops once its bracket "
        "is within rtol of its radius (docs/METHOD.md, Step 3; docs/PERFORMANCE.md, "
        "'The training search: cost against benefit')",
        at_least(0),
    )
    radius_warm_start: bool = setting(
        True, "start each sample's ACERT radius search from its radius of the last epoch"
    )
    cap_check: str = setting(
        "search",
        "how a sample is found certified at the cap: search (the radius search's first "
        "evaluation, then the training pass) or training-pass (the training pass at the cap "
        "is the check; only the others are searched; docs/PERFORMANCE.md, 'The training pass "
        "as the check at the cap')",
        OneOf(CAP_CHECKS),
    )

    def search(self) -> SearchSettings:
        """The training search: these settings on :data:`acert.radius.TRAINING_SEARCH`."""
        return replace(
            TRAINING_SEARCH,
            strategy=self.radius_search,
            max_iter=self.radius_max_iter,
            rtol=self.radius_rtol,
        )

    def memory(self) -> RadiusMemory | None:
        """A fresh radius memory for warm starts, or None for cold searches."""
        return RadiusMemory() if self.radius_warm_start else None


def training_search(config: Any) -> SearchSettings:
    """The training search of a config: ``radius_search``, ``radius_max_iter``, ``radius_rtol``
    on :data:`acert.radius.TRAINING_SEARCH`."""
    return ACERTSettings.read(config).search()


class RadiusMemory:
    """Each training sample's last radius, by dataset index, to warm-start its next search.

    A sample whose last radius was the cap gets no guess (its search starts at the new cap,
    where it is most likely certified again). Guesses only speed the search up: every bracket
    end is evaluated (:func:`acert.radius.radius_search`), so a stale guess is never unsound.
    """

    def __init__(self) -> None:
        self.radius = torch.empty(0)
        self.capped = torch.empty(0, dtype=torch.bool)

    def _grow(self, size: int) -> None:
        if size > self.radius.numel():
            extra = size - self.radius.numel()
            self.radius = torch.cat([self.radius, torch.full((extra,), float("nan"))])
            self.capped = torch.cat([self.capped, torch.zeros(extra, dtype=torch.bool)])

    def guess(self, idx: Tensor) -> Tensor:
        """(B,) last radii of the samples ``idx``; NaN where unknown or capped."""
        idx = idx.cpu()
        self._grow(int(idx.max()) + 1)
        guess = self.radius[idx].clone()
        guess[self.capped[idx]] = float("nan")
        return guess

    def remember(self, idx: Tensor, radius: Tensor, cap: float) -> None:
        idx = idx.cpu()
        self._grow(int(idx.max()) + 1)
        self.radius[idx] = radius.detach().float().cpu()
        self.capped[idx] = radius.detach().cpu() >= cap

    def state_dict(self) -> dict:
        return {"radius": self.radius.clone(), "capped": self.capped.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.radius, self.capped = state["radius"].clone(), state["capped"].clone()


def adaptive_radii(
    model: nn.Module,
    batch: Batch,
    step: Step,
    logits: Tensor,
    stats: BatchStats,
    search: SearchSettings,
    memory: RadiusMemory | None,
    min_warmup_eps: float = MIN_WARMUP_EPS,
    bound: str = "ibp",
) -> tuple[Tensor, float]:
    """(B,) certified radii of ``bound`` capped at ε_s, 0 if misclassified (docs/METHOD.md
    step 3; floored at ``min_warmup_eps`` in the warm-up), found without gradients by
    ``search``, warm-started from and remembered in ``memory``; and the mean number of bound
    evaluations per sample.

    Args:
        model: the network in train mode.
        batch: the batch (its ``idx`` keys the memory).
        step: the schedule's state; ``step.eps`` is the cap.
        logits: (B, K) clean logits of the batch.
        stats: clean-batch statistics of the train-mode batch-norms.
        search: the training search.
        memory: each sample's last radius, or None for cold searches.
        min_warmup_eps: floor of the radii during warm-up.
        bound: the bound that certifies the radii, ``"ibp"`` or ``"crown-ibp"``.
    """
    guess = None if memory is None else memory.guess(batch.idx)
    known = KnownBatch(logits=logits.detach(), stats=stats, guess=guess)
    with torch.no_grad():
        result = radius_search(model, batch.x, batch.y, step.eps, bound, search, known=known)
    if memory is not None:
        memory.remember(batch.idx, result.radius, step.eps)
    radii = result.radius.clamp(min=min_warmup_eps) if step.warmup else result.radius
    return radii, result.mean_evaluations


@register_method("acert", knobs={"kappa": "κ"}, settings=ACERTSettings)
@dataclass
class ACERT:
    """The ACERT loss; κ moves the model along the accuracy–robustness trade-off.

    Attributes:
        kappa: weight κ of the clean loss in ``(1-κ)·L_rob + κ·L_std``.
        regularizer: the warm-up regularisers.
        search: the radius search of the training radii (:data:`acert.radius.TRAINING_SEARCH`:
            Brent, at most 10 iterations, xtol 1e-6, rtol 1e-4, ftol 1e-5, plain arithmetic);
            change it with ``dataclasses.replace(TRAINING_SEARCH, max_iter=20)``.
        min_warmup_eps: floor of the radii during warm-up (1e-6).
        memory: last radius per training sample for warm starts (None: cold searches).
        cap_check: ``"search"`` or ``"training-pass"``
            (:mod:`acert.methods.cap_first`; the same radii and loss, fewer passes).
    """

    kappa: float = 0.0
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    search: SearchSettings = TRAINING_SEARCH
    min_warmup_eps: float = MIN_WARMUP_EPS
    memory: RadiusMemory | None = field(default_factory=RadiusMemory)
    cap_check: str = "search"

    @classmethod
    def from_config(cls, config: Any) -> ACERT:
        """κ, the warm-up regularisers and the training search of the config."""
        settings = ACERTSettings.read(config)
        return cls(
            kappa=settings.kappa,
            regularizer=WarmupRegularizer.from_config(config),
            search=settings.search(),
            memory=settings.memory(),
            cap_check=settings.cap_check,
        )

    def __post_init__(self) -> None:
        check_settings(self.search, "search")

    def adaptive_radii(
        self, model: nn.Module, batch: Batch, step: Step, logits: Tensor, stats: BatchStats
    ) -> tuple[Tensor, float]:
        """(B,) IBP certified radii capped at ε_s, 0 if misclassified (docs/METHOD.md step 3), by
        the search of ``self.search``, warm-started from the memory."""
        return adaptive_radii(
            model, batch, step, logits, stats, self.search, self.memory, self.min_warmup_eps
        )

    def loss(self, model: nn.Module, batch: Batch, step: Step) -> LossTerms:
        """docs/METHOD.md, "Training loss" steps 1-5."""
        logits, stats = clean_forward(model, batch.x)
        if step.eps == 0:
            return standard_phase_terms(
                model, batch, logits, stats, step, self.regularizer, self.min_warmup_eps
            )
        if self.cap_check == "training-pass" and not self.search.sound:
            return self._cap_first_loss(model, batch, step, logits, stats)
        radii, evaluations = self.adaptive_radii(model, batch, step, logits, stats)
        terms = certified_objective(
            model, batch, radii, step, logits, stats, self.kappa, self.regularizer
        )
        terms.metrics["radius_evals"] = evaluations
        terms.radii = radii.detach()
        return terms

    def _cap_first_loss(
        self, model: nn.Module, batch: Batch, step: Step, logits: Tensor, stats: BatchStats
    ) -> LossTerms:
        """:meth:`loss` with the training pass as the check at the cap
        (:mod:`acert.methods.cap_first`): the same terms, from one or two training passes."""
        guess = None if self.memory is None else self.memory.guess(batch.idx)
        floor = self.min_warmup_eps if step.warmup else None
        bounds, result = cap_first_pass(
            model, batch, step, logits, stats, self.search, guess, floor
        )
        if self.memory is not None:
            self.memory.remember(batch.idx, result.radius, step.eps)
        radii = result.radius if floor is None else result.radius.clamp(min=floor)
        terms = mixed_objective(robust_cross_entropy(bounds.margins), logits, batch.y, self.kappa)
        terms.metrics["radius"] = radii.mean().item()
        terms = with_warmup(terms, self.regularizer, model, bounds, stats, step)
        terms.metrics["certified"] = bounds.certified
        terms.metrics["radius_evals"] = result.mean_evaluations
        terms.radii = radii.detach()
        return terms

    def state_dict(self) -> dict:
        return {} if self.memory is None else {"radius_memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.memory is not None and "radius_memory" in state:
            self.memory.load_state_dict(state["radius_memory"])
