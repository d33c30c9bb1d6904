"""TAPS (Mao et al. 2023, "TAPS: Connecting certified and adversarial training", NeurIPS;
docs/METHOD.md (M20)).

The network ``f = f_C ∘ f_E`` is split into a feature extractor f_E and a classifier head f_C
of the last ``head`` layers of the ``nn.Sequential`` (``taps_head``; 4, the hidden linear block
and the last linear layer of CNN7, as in the reference scripts):

1. IBP through f_E gives the latent box ``[z_lo, z_hi]`` of the input box;
2. PGD through f_C inside that box estimates the worst case of every margin separately: for
   each class t != y one point ``z_t*`` minimising ``f_y - f_t`` ("multi-estimator PGD"),
   started uniformly in the box, step ``max(0.2, 2/steps)`` of the box width (decayed ×0.1 at
   the reference's milestones past 20 steps), and the latent point of the clean input kept as
   a candidate, so the estimate ``m̂_t = f_y(z_t*) - f_t(z_t*)`` lies between the IBP bound
   and the clean margin;
3. the gradient connector passes the gradient at z_t* back to the box bounds, so f_E
   learns from the estimate: coordinate by coordinate the rectified linear connector gives
   ``∂z*/∂z_hi = max(0, z* - (z_hi - c·w)) / (c·w)`` on the upper ``c·w`` of the width
   ``w = z_hi - z_lo`` and, mirrored, ``∂z*/∂z_lo`` on its lower ``c·w`` (``taps_connector``,
   c = 0.5 in the authors' scripts); the forward value is z* itself;
4. the loss multiplies the robust CE of the estimates with the IBP robust CE over the
   same box, ``L = L_TAPS · L_IBP``, the gradient of L_TAPS scaled by w (``taps_grad_scale``,
   4 on MNIST, 2 on CIFAR-10 in the authors' scripts): ``∇L = w·L_IBP·∇L_TAPS + L_TAPS·∇L_IBP``.

During warm-up the regularisers of Shi et al. 2021 act on the IBP pass (prefix and head), as
the reference does. No κ mix: like SABR, the loss is the robust term alone. Batch-norm (our
choice, see :mod:`acert.methods.base`): every pass, the latent PGD included, normalises with the
clean batch's statistics, so the estimate and the bound are of the same function. L_TAPS and
L_IBP are global-batch means (:func:`acert.methods.exp_ibp.global_mean`): their product is then
the same on every process of a distributed run.

STAPS (:mod:`acert.methods.staps`) runs the same steps on SABR's small box.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from acert.bounds import BatchStats, Interval, input_box
from acert.bounds import ibp as ibp_rules
from acert.bounds.clean_pass import forward_with_stats
from acert.bounds.spec import other_classes
from acert.foundation.errors import ConfigError
from acert.foundation.ranges import above, at_least, between
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
)
from acert.methods.exp_ibp import global_mean, robust_cross_entropies
from acert.methods.registry import register_method
from acert.methods.warmup import WarmupRegularizer

__all__ = [
    "TAPS",
    "TAPSPass",
    "check_head",
    "connect",
    "latent_attack",
    "taps_objective",
    "taps_pass",
]

CONNECTOR_TOLERANCE = 1e-5
"""Floor of the connector's slack ``c·w`` (a box of zero width splits its gradient in halves)."""


class _RectifiedLinearConnector(torch.autograd.Function):
    """Forward: the points. Backward: their gradient, weighted by the rectified linear
    connector, to the box bounds (summed over the K-1 points of each sample)."""

    @staticmethod
    def forward(ctx, lower: Tensor, upper: Tensor, points: Tensor, c: float) -> Tensor:
        ctx.save_for_backward(lower, upper, points)
        ctx.c = c
        return points.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        lower, upper, points = ctx.saved_tensors
        lower, upper = lower.unsqueeze(1), upper.unsqueeze(1)
        slack = ctx.c * (upper - lower)
        scale = slack.clamp_min(CONNECTOR_TOLERANCE)
        floor = 0.5 * CONNECTOR_TOLERANCE
        near_upper = points >= upper - slack
        near_lower = points <= lower + slack
        to_upper = (points - (upper - slack)).clamp_min(floor) / scale * near_upper
        to_lower = ((lower + slack) - points).clamp_min(floor) / scale * near_lower
        return (grad * to_lower).sum(1), (grad * to_upper).sum(1), None, None


def connect(box: Interval, points: Tensor, c: float = 0.5) -> Tensor:
    """The points, with the gradient connector to the box's bounds (Mao et al. 2023).

    Args:
        box: (B, ...) latent box whose bounds carry gradients.
        points: (B, N, ...) points inside it, no gradient of their own.
        c: share of the width, at each end, over which the gradient moves to that bound.
    """
    return _RectifiedLinearConnector.apply(box.lower, box.upper, points.detach(), c)


def _milestones(steps: int) -> tuple[int, ...]:
    """The steps after which the reference's latent PGD divides its step by 10."""
    if 20 <= steps <= 50:
        fractions: tuple[float, ...] = (0.7,)
    elif 50 < steps <= 80:
        fractions = (0.4, 0.7)
    elif steps > 80:
        fractions = (0.3, 0.6, 0.8)
    else:
        fractions = ()
    return tuple(int(steps * f) for f in fractions)


def _head_margins(head: nn.Sequential, points: Tensor, y: Tensor, stats: BatchStats) -> Tensor:
    """(B, N) ``f_y - f_{t_i}`` of the head at point i of each sample, t_i the i-th class != y.

    Args:
        head: the classifier head (K outputs).
        points: (B, N, ...) latent points, N = K-1.
        y: (B,) labels.
        stats: clean-batch statistics.
    """
    batch, n = points.shape[:2]
    logits = forward_with_stats(head, points.flatten(0, 1), stats).view(batch, n, -1)
    true = logits.gather(2, y.view(-1, 1, 1).expand(-1, n, 1)).squeeze(2)
    others = logits.gather(2, other_classes(y, logits.shape[2]).unsqueeze(2)).squeeze(2)
    return true - others


def latent_attack(
    head: nn.Sequential,
    box: Interval,
    y: Tensor,
    stats: BatchStats,
    anchor: Tensor,
    steps: int = 10,
    restarts: int = 1,
) -> Tensor:
    """TAPS's multi-estimator PGD in a latent box (Mao et al. 2023).

    Args:
        head: the classifier head, ending in the K-output linear layer.
        box: (B, ...) latent box (its gradients are not followed).
        y: (B,) labels.
        stats: clean-batch statistics.
        anchor: (B, ...) a latent point of each sample (its clean input's), a first candidate.
        steps: signed-gradient steps per restart.
        restarts: uniform random starts in the box (global torch RNG).

    Returns:
        (B, K-1, ...) for each class t != y the point found with the smallest ``f_y - f_t``.
    """
    lower, upper = box.lower.detach().unsqueeze(1), box.upper.detach().unsqueeze(1)
    n = head[-1].out_features - 1
    shape = (lower.shape[0], n, *lower.shape[2:])
    width = upper - lower
    best = torch.minimum(torch.maximum(anchor.detach().unsqueeze(1), lower), upper).expand(shape)
    best = best.clone()
    with torch.no_grad():
        best_margin = _head_margins(head, best, y, stats)
    milestones = _milestones(steps)
    for _ in range(restarts):
        noise = torch.rand(shape, device="cpu", dtype=lower.dtype).to(lower.device)
        points, rate = lower + noise * width, max(0.2, 2 / max(steps, 1))
        for step in range(steps + 1):
            points = points.detach().requires_grad_(step < steps)
            with torch.set_grad_enabled(step < steps):
                margins = _head_margins(head, points, y, stats)
            with torch.no_grad():
                improved = margins < best_margin
                best[improved] = points[improved].detach()
                best_margin = torch.where(improved, margins, best_margin)
            if step == steps:
                break
            (grad,) = torch.autograd.grad(margins.sum(), points)
            points = torch.minimum(torch.maximum(points - rate * width * grad.sign(), lower), upper)
            if step + 1 in milestones:
                rate *= 0.1
    return best.detach()


@dataclass(frozen=True)
class TAPSPass:
    """The bounds and estimates of one TAPS pass.

    Attributes:
        bounds: the IBP pass of the whole network (for L_IBP and the warm-up regularisers).
        latent: (B, ...) the latent box, output of the feature extractor.
        estimates: (B, K-1) ``f_y - f_t`` at the connected latent PGD points (with gradients).
    """

    bounds: IBPPass
    latent: Interval
    estimates: Tensor


def check_head(model: nn.Sequential, head: int) -> None:
    """A ConfigError unless ``model`` is a chain (:func:`acert.bounds.bounds_form`) and
    ``head`` leaves a non-empty feature extractor before it."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            "TAPS splits a chain of layers (an nn.Sequential) into a feature extractor and a "
            "head, but this model is a graph (a forward of its own, traced); train it with "
            "another method (acert, ibp, crown-ibp, sabr)"
        )
    if not 1 <= head < len(model):
        raise ConfigError(
            f"taps_head must lie in [1, {len(model) - 1}] for this {len(model)}-layer model, "
            f"got {head}"
        )


def taps_pass(
    model: nn.Sequential,
    box: Interval,
    y: Tensor,
    stats: BatchStats,
    anchor: Tensor,
    head: int,
    attack: TrainingAttack,
    connector: float = 0.5,
) -> TAPSPass:
    """IBP to the split, latent PGD through the head, connector to the latent box's bounds.

    Args:
        model: the network.
        box: (B, ...) input box inside [0, 1].
        y: (B,) labels.
        stats: clean-batch statistics.
        anchor: (B, ...) an input in the box whose latent point is a first PGD candidate.
        head: layers at the end of ``model`` that form the classifier head.
        attack: its ``steps`` and ``restarts`` drive the latent PGD (its step size does not).
        connector: the connector's c.
    """
    check_head(model, head)
    extractor, classifier = model[:-head], model[-head:]
    latent, early = ibp_rules.propagate(extractor, box, stats, sound=False)
    hidden, late = ibp_rules.propagate(classifier[:-1], latent, stats, sound=False)
    margins = ibp_rules.last_layer_margins(classifier[-1], hidden, y, sound=False)
    with torch.no_grad():
        start = forward_with_stats(extractor, anchor, stats)
    points = latent_attack(classifier, latent, y, stats, start, attack.steps, attack.restarts)
    estimates = _head_margins(classifier, connect(latent, points, connector), y, stats)
    return TAPSPass(IBPPass(box, early + late, margins), latent, estimates)


def taps_objective(estimates: Tensor, margins: Tensor, grad_scale: float) -> tuple[Tensor, ...]:
    """``L_TAPS · L_IBP`` with L_TAPS's gradient scaled by ``grad_scale`` (docs/METHOD.md (M20)).

    Returns:
        the loss, L_TAPS and L_IBP (scalars, global-batch means).
    """
    loss_taps = global_mean(robust_cross_entropies(estimates))
    loss_ibp = global_mean(robust_cross_entropies(margins))
    scaled = grad_scale * loss_taps - (grad_scale - 1) * loss_taps.detach()
    return scaled * loss_ibp, loss_taps, loss_ibp


@dataclass(frozen=True)
class TAPSSettings(Settings):
    """TAPS's config keys (STAPS's record inherits them)."""

    taps_head: int = setting(
        4,
        "TAPS/STAPS split: the model's last layers that form the PGD-searched head (fewer "
        "than the model's layers, checked when the method is built)",
        at_least(1, whole=True),
    )
    taps_grad_scale: float = setting(
        4.0, "TAPS/STAPS factor w on the gradient of L_TAPS in L_TAPS · L_IBP", above(0)
    )
    taps_connector: float = setting(
        0.5,
        "TAPS/STAPS gradient connector c: the share of the latent box's width at each end",
        between(0, 1, low_open=True),
    )


@register_method("taps", knobs={"taps_grad_scale": "w"}, settings=TAPSSettings)
@dataclass
class TAPS(Stateless):
    """``L_TAPS · L_IBP`` over the ε-ball, plus warm-up regularisers; L_std and the warm-up
    regularisers while ε_s = 0.

    Attributes:
        head: layers at the end of the network that form the classifier head (``taps_head``).
        grad_scale: w, the factor on L_TAPS's gradient (``taps_grad_scale``).
        connector: c of the gradient connector (``taps_connector``).
        attack: its steps and restarts drive the latent PGD (``pgd_steps``, ``pgd_restarts``).
        regularizer: the warm-up regularisers (Shi et al. 2021).
    """

    head: int = 4
    grad_scale: float = 4.0
    connector: float = 0.5
    attack: TrainingAttack = field(default_factory=TrainingAttack)
    regularizer: WarmupRegularizer = field(default_factory=WarmupRegularizer)
    owns_kappa: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Any) -> TAPS:
        return cls(**cls.config_knobs(config))

    @staticmethod
    def config_knobs(config: Any) -> dict[str, Any]:
        """The settings TAPS and STAPS read from a config."""
        settings = TAPSSettings.read(config)
        return {
            "head": settings.taps_head,
            "grad_scale": settings.taps_grad_scale,
            "connector": settings.taps_connector,
            "attack": TrainingAttack.from_config(config),
            "regularizer": WarmupRegularizer.from_config(config),
        }

    def box(
        self, model: nn.Sequential, batch: Batch, eps: float | Tensor
    ) -> tuple[Interval, Tensor]:
        """The input box and a point of it whose latent point starts the search: the clipped
        ε-ball and the clean input."""
        return input_box(batch.x, eps), batch.x

    def check_model(self, model: nn.Sequential) -> None:
        """A ConfigError unless the head leaves a feature extractor in ``model``."""
        check_head(model, self.head)

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms:
        self.check_model(model)  # from the first step, the standard phase's too
        return fixed_eps_loss(self, model, batch, step)

    def robust_terms(
        self,
        model: nn.Sequential,
        batch: Batch,
        step: Step,
        logits: Tensor,
        stats: BatchStats,
        eps: float | Tensor,
    ) -> tuple[LossTerms, IBPPass]:
        """``L_TAPS · L_IBP`` over the box at radius ``eps`` before the warm-up regularisers,
        and the IBP pass."""
        terms = clean_terms(logits, batch.y)
        box, anchor = self.box(model, batch, eps)
        result = taps_pass(
            model, box, batch.y, stats, anchor, self.head, self.attack, self.connector
        )
        loss, loss_taps, loss_ibp = taps_objective(
            result.estimates, result.bounds.margins, self.grad_scale
        )
        terms.metrics.update(
            loss_rob=loss_ibp.item(),
            loss_taps=loss_taps.item(),
            certified=result.bounds.certified,
            taps_certified=(result.estimates.min(1).values > 0).float().mean().item(),
        )
        return LossTerms(loss, logits, terms.metrics), result.bounds
