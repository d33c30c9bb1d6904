"""A training method's loss for a training loop of your own.

``acert.fit`` and ``acert train`` run the project's loop (ε schedule, warm-up, checkpoints); a
researcher with a loop of their own calls the same loss per batch::

    loss_fn = acert.ACERTLoss(kappa=0.25, eps_max=0.3)
    terms = loss_fn(model, x, y, eps, idx)   # eps: your schedule's ε at this step
    terms.loss.backward()                    # terms.radii: each sample's training radius

The loss is exactly the one the project's loop computes for the method (docs/METHOD.md,
"Training loss"); ``eps`` is the step's training ε, ``idx`` the rows of the batch in the
training set (per-sample state: ACERT's radius memory warm-starts each sample's search from its
last radius; without ``idx`` the searches start cold).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from acert.foundation.errors import AcertError
from acert.methods.acert import ACERT
from acert.methods.base import Batch, LossTerms, Step, TrainingMethod

__all__ = ["ACERTLoss", "TrainingLoss"]


@dataclass
class TrainingLoss:
    """``loss_fn(model, x, y, eps, idx=None, warmup=None) -> LossTerms`` of ``method``.

    Attributes:
        method: a training method object (``acert.methods.ACERT(kappa=0.25)``, ``IBP()``, ...).
        eps_max: the final training ε of your schedule, pixel units.
    """

    method: TrainingMethod
    eps_max: float
    steps: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.eps_max, int | float) and 0 < self.eps_max <= 1):
            raise AcertError(f"eps_max must lie in (0, 1] pixel units, got {self.eps_max!r}")

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        eps: float,
        idx: Tensor | None = None,
        warmup: bool | None = None,
    ) -> LossTerms:
        """The method's loss on the batch (x, y) at training ε ``eps``.

        Args:
            model: the network, in train mode.
            x: (B, ...) inputs in [0, 1]; y: (B,) int64 labels.
            eps: this step's training ε in [0, eps_max]; 0 is standard training with the
                warm-up regularisers.
            idx: (B,) rows of the samples in the training set, for per-sample state.
            warmup: whether the step is in the warm-up (the regularisers and ACERT's radius
                floor apply); default: while ``eps < eps_max``.

        Returns:
            :class:`~acert.methods.LossTerms`: ``loss``, clean ``logits``, ``metrics`` and, for
            ACERT, the per-sample training ``radii``.
        """
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.shape[0] != y.shape[0]:
            raise AcertError("x and y must be tensors of the same batch size; pass torch tensors")
        if not (isinstance(eps, int | float) and math.isfinite(eps) and 0 <= eps <= self.eps_max):
            raise AcertError(f"eps must lie in [0, eps_max={self.eps_max}], got {eps!r}")
        in_warmup = eps < self.eps_max if warmup is None else warmup
        step = Step(self.steps, 0, float(eps), self.eps_max, in_warmup)
        self.steps += 1
        with _cold_if_unindexed(self.method, idx):
            rows = torch.arange(x.shape[0], device=x.device) if idx is None else idx
            return self.method.loss(model, Batch(x, y, rows), step)


class ACERTLoss(TrainingLoss):
    """The ACERT loss for your own loop; ``settings`` are :class:`~acert.methods.ACERT`'s
    (``regularizer``, ``search``: a :class:`~acert.radius.SearchSettings`, ``memory``, ...)."""

    def __init__(self, eps_max: float, kappa: float = 0.0, **settings: Any) -> None:
        super().__init__(ACERT(kappa=kappa, **settings), eps_max)


@contextlib.contextmanager
def _cold_if_unindexed(method: TrainingMethod, idx: Tensor | None) -> Iterator[None]:
    """Without sample indices a per-sample memory would mix samples up: leave it out."""
    memory = getattr(method, "memory", None)
    if idx is not None or memory is None:
        yield
        return
    method.memory = None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        method.memory = memory  # type: ignore[attr-defined]
