"""What every training method shares: the batch and step it receives, the loss terms it returns,
and the certified objective of the IBP family (METHOD.md, "Training loss", steps 4-5).

A method follows CTBench's split: clean pass (sets batch-norm statistics) -> bounds -> loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acert.bounds import BatchStats, input_box
from acert.bounds import ibp as ibp_rules
from acert.methods.warmup import WarmupRegularizer

__all__ = [
    "Batch",
    "LossTerms",
    "Step",
    "TrainingMethod",
    "certified_objective",
    "robust_cross_entropy",
]


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
    """

    loss: Tensor
    logits: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingMethod(Protocol):
    """One training method: one loss. ``state_dict`` holds what must survive a resume."""

    name: str

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Stateless:
    """Mixin for methods with nothing to carry across a resume."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def robust_cross_entropy(margin_lower: Tensor) -> Tensor:
    """``mean log(1 + Σ_t exp(-lb_t))``, the CE of logits ``[0, -lb]`` for class 0 (METHOD.md 4).

    Args:
        margin_lower: (B, K-1) lower bounds of ``f_y - f_t``.
    """
    return torch.logsumexp(F.pad(-margin_lower, (1, 0)), dim=1).mean()


def certified_objective(
    model: nn.Sequential,
    batch: Batch,
    eps: Tensor,
    step: Step,
    logits: Tensor,
    stats: BatchStats,
    kappa: float,
    regularizer: WarmupRegularizer,
) -> LossTerms:
    """``(1-κ)·L_rob + κ·L_std`` plus the warm-up regularisers (METHOD.md, "Training loss" 4-5).

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
    box = input_box(batch.x, eps)
    hidden, preactivations = ibp_rules.propagate(model[:-1], box, stats)
    margins = ibp_rules.last_layer_margins(model[-1], hidden, batch.y)
    loss_std = F.cross_entropy(logits, batch.y)
    loss_rob = robust_cross_entropy(margins)
    loss = (1 - kappa) * loss_rob + kappa * loss_std
    metrics = {
        "loss_std": loss_std.item(),
        "loss_rob": loss_rob.item(),
        "radius": eps.mean().item(),
    }
    if step.warmup:
        reg = regularizer(model, box, preactivations, stats)
        loss = loss + (1 - step.ramp_fraction) * reg
        metrics["loss_reg"] = reg.item()
    metrics["certified"] = (margins.min(1).values > 0).float().mean().item()
    return LossTerms(loss, logits, metrics)
