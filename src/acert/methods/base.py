"""What every training method shares: the batch and step it receives, the loss terms it returns,
and the certified objective of the IBP family (docs/METHOD.md, "Training loss", steps 4-5).

A method follows CTBench's split: clean pass (sets batch-norm statistics) -> bounds -> loss.
The clean pass is the only one that touches batch-norm running statistics; every later pass of
the same batch (bounds, adversarial points) normalises with the clean batch's statistics, so all
terms of a loss are computed on one and the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds import BatchStats, Interval, clean_forward, input_box
from acert.bounds import ibp as ibp_rules
from acert.bounds.clean_pass import forward_with_stats
from acert.foundation.ranges import ATTACK_RESTARTS, ATTACK_STEP_SIZE, ATTACK_STEPS
from acert.methods.warmup import WarmupRegularizer
from acert.radius.attacks import eval_mode, pgd_attack

__all__ = [
    "ATTACK_RESTARTS",
    "ATTACK_STEPS",
    "ATTACK_STEP_SIZE",
    "Batch",
    "CertifiedLoss",
    "IBPPass",
    "LossTerms",
    "Step",
    "TrainingAttack",
    "TrainingMethod",
    "adversarial_terms",
    "certified_objective",
    "certified_terms",
    "clean_terms",
    "fixed_eps_loss",
    "ibp_pass",
    "mean_radius",
    "mixed_objective",
    "robust_cross_entropy",
    "standard_phase_terms",
    "with_warmup",
]

MIN_WARMUP_EPS = 1e-6
"""Floor of the training radii during warm-up (docs/METHOD.md, "Training loss" 3): while ε_s is 0
the regularisers are computed on IBP intervals of this radius."""


@dataclass(frozen=True)
class Batch:
    """One training batch.

    Attributes:
        x: (B, C, H, W) inputs in [0, 1].
        y: (B,) labels.
        idx: (B,) row of each sample in the training set (for per-sample state).
    """

    x: Tensor
    y: Tensor
    idx: Tensor


@dataclass(frozen=True)
class Step:
    """Where training stands when a batch's loss is computed.

    Attributes:
        index: global optimisation step.
        epoch: current epoch (0-based).
        eps: training ε of this step from the schedule, pixel units.
        eps_max: the final training ε.
        warmup: True during standard training and the ramp (epoch < stn + reg epochs).
    """

    index: int
    epoch: int
    eps: float
    eps_max: float
    warmup: bool

    @property
    def ramp_fraction(self) -> float:
        """ε / ε_max, the progress of the ramp in [0, 1]."""
        return self.eps / self.eps_max if self.eps_max > 0 else 1.0


@dataclass
class LossTerms:
    """A method's loss and what it reports about the batch.

    Attributes:
        loss: scalar to minimise.
        logits: (B, K) clean logits (for the training accuracy).
        metrics: named scalars for the logs (e.g. ``loss_rob``, ``radius``).
        radii: (B,) the per-sample training radii of an adaptive method (ACERT), else None.
    """

    loss: Tensor
    logits: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    radii: Tensor | None = None


class TrainingMethod(Protocol):
    """One training method: one loss. ``state_dict`` holds what must survive a resume."""

    name: str

    def loss(self, model: nn.Module, batch: Batch, step: Step) -> LossTerms: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CertifiedLoss(TrainingMethod, Protocol):
    """A method with a certified loss, which :mod:`acert.methods.adaptive` evaluates at each
    sample's own radius.

    Attributes:
        owns_kappa: whether :meth:`robust_terms` mixes in the clean loss itself (IBP,
            CROWN-IBP); otherwise the adaptive wrapper adds ``κ·L_std``.
        regularizer: the warm-up regularisers, added by the caller on the returned IBP pass.
    """

    owns_kappa: ClassVar[bool]
    regularizer: WarmupRegularizer

    def robust_terms(
        self,
        model: nn.Module,
        batch: Batch,
        step: Step,
        logits: Tensor,
        stats: BatchStats,
        eps: float | Tensor,
    ) -> tuple[LossTerms, IBPPass]:
        """The loss at radius ``eps`` (a number, or (B,) per sample) before the warm-up
        regularisers, and the IBP pass they act on; ``step`` gives the schedule's ε_s."""
        ...


class Stateless:
    """Mixin for methods with nothing to carry across a resume."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def mean_radius(eps: float | Tensor) -> float:
    """The mean of a training radius given as a number or as (B,) per-sample radii."""
    return eps.mean().item() if isinstance(eps, Tensor) else eps


def robust_cross_entropy(margin_lower: Tensor) -> Tensor:
    """``mean log(1 + Σ_t exp(-lb_t))``, the CE of logits ``[0, -lb]`` for class 0
    (docs/METHOD.md 4).

    Args:
        margin_lower: (B, K-1) lower bounds of ``f_y - f_t``.
    """
    return torch.logsumexp(F.pad(-margin_lower, (1, 0)), dim=1).mean()


def clean_terms(logits: Tensor, y: Tensor) -> LossTerms:
    """Standard training's ``CE(f(x), y)``, what every method uses while ε_s = 0.

    Args:
        logits: (B, K) clean logits.
        y: (B,) labels.
    """
    loss = F.cross_entropy(logits, y)
    return LossTerms(loss, logits, {"loss_std": loss.item()})


def mixed_objective(loss_rob: Tensor, logits: Tensor, y: Tensor, kappa: float) -> LossTerms:
    """``(1-κ)·L_rob + κ·L_std`` (docs/METHOD.md, "Training loss" 5).

    Args:
        loss_rob: scalar robust loss.
        logits: (B, K) clean logits of the batch.
        y: (B,) labels.
        kappa: weight of the clean loss.
    """
    loss_std = F.cross_entropy(logits, y)
    loss = (1 - kappa) * loss_rob + kappa * loss_std
    return LossTerms(loss, logits, {"loss_std": loss_std.item(), "loss_rob": loss_rob.item()})


@dataclass(frozen=True)
class IBPPass:
    """One IBP propagation of an input box (Gowal et al. 2019).

    Attributes:
        box: (B, ...) the input box.
        preactivations: the interval at the input of every ReLU, in order.
        margins: (B, K-1) lower bounds of ``f_y - f_t`` for t != y.
    """

    box: Interval
    preactivations: list[Interval]
    margins: Tensor

    @property
    def certified(self) -> float:
        """Fraction of the batch whose margins are all positive over the box."""
        return (self.margins.min(1).values > 0).float().mean().item()


def ibp_pass(model: nn.Module, box: Interval, y: Tensor, stats: BatchStats) -> IBPPass:
    """IBP margins of ``box`` and the pre-activation intervals the warm-up regularisers read:
    a training objective, so the plain interval arithmetic, not widened for rounding (which at
    the warm-up's ε = 1e-6 would swamp the intervals the regularisers measure).

    Args:
        model: the network; train-mode batch-norms normalise with ``stats``.
        box: (B, ...) input interval inside [0, 1].
        y: (B,) labels.
        stats: clean-batch statistics from :func:`acert.bounds.clean_forward`.
    """
    head, last = ibp_rules.prepare_head(model, stats, sound=False)
    hidden, preactivations = head(box)
    margins = ibp_rules.last_layer_margins(last, hidden, y, sound=False)
    return IBPPass(box, preactivations, margins)


def with_warmup(
    terms: LossTerms,
    regularizer: WarmupRegularizer,
    model: nn.Module,
    bounds: IBPPass,
    stats: BatchStats,
    step: Step,
) -> LossTerms:
    """During warm-up add ``(1 - ε_s/ε_max)·(λ_tight·L_tight + λ_relu·L_relu)`` of one IBP pass
    (docs/METHOD.md, "Training loss" 5; Shi et al. 2021); after it, ``terms`` unchanged.

    Args:
        terms: the loss so far.
        regularizer: the warm-up regularisers.
        model: the network.
        bounds: the IBP pass whose pre-activation intervals are regularised.
        stats: clean-batch statistics.
        step: the schedule's state (warm-up flag and ramp progress).
    """
    if not step.warmup:
        return terms
    reg = regularizer(model, bounds.box, bounds.preactivations, stats)
    terms.metrics["loss_reg"] = reg.item()
    return LossTerms(terms.loss + (1 - step.ramp_fraction) * reg, terms.logits, terms.metrics)


def standard_phase_terms(
    model: nn.Module,
    batch: Batch,
    logits: Tensor,
    stats: BatchStats,
    step: Step,
    regularizer: WarmupRegularizer,
    eps: float = MIN_WARMUP_EPS,
) -> LossTerms:
    """The loss of a certified method while ε_s = 0: ``L_std``, plus during warm-up the
    regularisers at full weight on one IBP pass at the floor radius ``eps`` (docs/METHOD.md,
    "Training loss" 3 and 5, as in the standard epoch of the ACERT reference code and of Shi et
    al. 2021, whose warm-up regularises from the first step).

    Args:
        model: the network in train mode.
        batch: the batch.
        logits: (B, K) clean logits of the batch (with gradients).
        stats: clean-batch statistics of the train-mode batch-norms.
        step: the schedule's state.
        regularizer: the warm-up regularisers.
        eps: radius of the IBP pass, pixel units.
    """
    terms = clean_terms(logits, batch.y)
    if not (step.warmup and regularizer.active):
        return terms
    bounds = ibp_pass(model, input_box(batch.x, eps), batch.y, stats)
    return with_warmup(terms, regularizer, model, bounds, stats, step)


def certified_objective(
    model: nn.Module,
    batch: Batch,
    eps: Tensor,
    step: Step,
    logits: Tensor,
    stats: BatchStats,
    kappa: float,
    regularizer: WarmupRegularizer,
) -> LossTerms:
    """``(1-κ)·L_rob + κ·L_std`` plus the warm-up regularisers
    (docs/METHOD.md, "Training loss" 4-5).

    Args:
        model: the network in train mode.
        batch: the batch.
        eps: (B,) training radius of each sample, pixel units.
        step: the schedule's state.
        logits: (B, K) clean logits of the same batch (with gradients).
        stats: clean-batch statistics of the train-mode batch-norms.
        kappa: weight of the clean loss.
        regularizer: Shi et al. 2021 warm-up terms, weighted by ``1 - ε/ε_max`` in warm-up.
    """
    terms, bounds = certified_terms(model, batch, eps, logits, stats, kappa)
    terms = with_warmup(terms, regularizer, model, bounds, stats, step)
    terms.metrics["certified"] = bounds.certified
    return terms


def certified_terms(
    model: nn.Module,
    batch: Batch,
    eps: Tensor,
    logits: Tensor,
    stats: BatchStats,
    kappa: float,
) -> tuple[LossTerms, IBPPass]:
    """:func:`certified_objective` before the warm-up regularisers: ``(1-κ)·L_rob + κ·L_std``
    and the IBP pass that gives L_rob (the regularisers' intervals)."""
    bounds = ibp_pass(model, input_box(batch.x, eps), batch.y, stats)
    terms = mixed_objective(robust_cross_entropy(bounds.margins), logits, batch.y, kappa)
    terms.metrics["radius"] = eps.mean().item()
    return terms, bounds


@dataclass(frozen=True)
class TrainingAttack:
    """PGD inside a training loss (Madry et al. 2018), on the clipped ε-ball, CE objective.

    The attack runs in eval mode: batch-norm normalises with its running statistics and the
    adversarial batch never enters them (the running statistics stay those of clean batches).
    The random starts draw from the global torch RNG, which the trainer saves on resume.

    Attributes:
        steps: signed-gradient steps per restart (``pgd_steps``).
        step_size: step length in pixel units; None gives ``2.5·ε/steps`` (``pgd_step_size``).
        restarts: random starts (``pgd_restarts``).
    """

    steps: int = 10
    step_size: float | None = None
    restarts: int = 1

    @classmethod
    def from_config(cls, config: Any) -> TrainingAttack:
        """The config's ``pgd_steps``, ``pgd_step_size`` and ``pgd_restarts``."""
        return cls(config.pgd_steps, config.pgd_step_size, config.pgd_restarts)

    def __post_init__(self) -> None:
        ATTACK_STEPS.check(self.steps, "pgd_steps")
        ATTACK_STEP_SIZE.check(self.step_size, "pgd_step_size")
        ATTACK_RESTARTS.check(self.restarts, "pgd_restarts")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
        """(B, ...) the adversarial points found in ``{x' : |x' - x|_∞ <= eps} ∩ [0, 1]``;
        ``eps`` a number or (B,) per-sample radii (the default step, 2.5·ε/steps, is then
        per sample too)."""
        with eval_mode(model):
            return pgd_attack(
                model, x, y, eps, self.steps, self.step_size, self.restarts, loss="ce"
            )


def adversarial_terms(
    model: nn.Module, x_adv: Tensor, y: Tensor, stats: BatchStats
) -> tuple[Tensor, float]:
    """``CE(f(x_adv), y)`` with the clean batch's statistics, and the accuracy at ``x_adv``.

    Args:
        model: the network.
        x_adv: (B, ...) adversarial points.
        y: (B,) labels.
        stats: clean-batch statistics.

    Returns:
        the scalar loss (with gradients) and the fraction of x_adv classified correctly.
    """
    logits = forward_with_stats(model, x_adv, stats)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return F.cross_entropy(logits, y), accuracy


def fixed_eps_loss(method: CertifiedLoss, model: nn.Module, batch: Batch, step: Step) -> LossTerms:
    """A certified method's loss at the schedule's ε_s: the clean pass (it sets the batch-norm
    statistics), the standard phase while ε_s = 0, else the method's :meth:`robust_terms` at
    ε_s plus the warm-up regularisers on its IBP pass."""
    logits, stats = clean_forward(model, batch.x)
    if step.eps == 0:
        return standard_phase_terms(model, batch, logits, stats, step, method.regularizer)
    terms, bounds = method.robust_terms(model, batch, step, logits, stats, step.eps)
    return with_warmup(terms, method.regularizer, model, bounds, stats, step)
