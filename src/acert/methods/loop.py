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
import dataclasses
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from acert.bounds import bounds_form, check_batch, check_input_dtype
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
        eps_max = _number(self.eps_max)
        if eps_max is None or not 0 < eps_max <= 1:
            raise AcertError(f"eps_max must lie in (0, 1] pixel units, got {self.eps_max!r}")
        self.eps_max = eps_max

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
            model: the network, in train mode: a chain of supported layers or any module
                tracing takes (:func:`acert.bounds.bounds_form`).
            x: (B, ...) inputs in [0, 1]; y: (B,) int64 labels.
            eps: this step's training ε in [0, eps_max] (a number, numpy scalar or one-element
                tensor); 0 is standard training with the warm-up regularisers.
            idx: (B,) rows of the samples in the training set, for per-sample state.
            warmup: whether the step is in the warm-up (the regularisers and ACERT's radius
                floor apply); default: while ``eps < eps_max``.

        Returns:
            :class:`~acert.methods.LossTerms`: ``loss``, clean ``logits``, ``metrics`` and, for
            ACERT, the per-sample training ``radii``.
        """
        check_batch(x, y)
        check_input_dtype(model, x)
        value = _number(eps)
        if value is None or not (math.isfinite(value) and 0 <= value <= self.eps_max):
            raise AcertError(f"eps must lie in [0, eps_max={self.eps_max}], got {eps!r}")
        _check_rows(idx, x.shape[0])
        in_warmup = value < self.eps_max if warmup is None else warmup
        step = Step(self.steps, 0, value, self.eps_max, in_warmup)
        self.steps += 1
        with _cold_if_unindexed(self.method, idx):
            rows = torch.arange(x.shape[0], device=x.device) if idx is None else idx
            # a model with a forward of its own is bounded as its traced graph (cached)
            form = bounds_form(model, tuple(x.shape[1:]))
            return self.method.loss(form, Batch(x, y, rows), step)


class ACERTLoss(TrainingLoss):
    """The ACERT loss for your own loop; ``settings`` are :class:`~acert.methods.ACERT`'s
    (``regularizer``, ``search``: a :class:`~acert.radius.SearchSettings`, ``memory``, ...)."""

    def __init__(self, eps_max: float, kappa: float = 0.0, **settings: Any) -> None:
        known = {f.name for f in dataclasses.fields(ACERT) if f.init} - {"kappa"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise AcertError(
                f"ACERTLoss has no setting {', '.join(map(repr, unknown))}; "
                f"its settings are eps_max, kappa, {', '.join(sorted(known))}"
            )
        super().__init__(ACERT(kappa=kappa, **settings), eps_max)


def _number(value: object) -> float | None:
    """A real number given as a Python or numpy scalar or a one-element tensor, as a float;
    None for anything else (a bool, a complex, a tensor of several values)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _check_rows(idx: object, batch: int) -> None:
    """One-line :class:`AcertError` unless ``idx`` is None or (B,) integer row indices >= 0."""
    if idx is None:
        return
    if not isinstance(idx, Tensor):
        raise AcertError(
            f"idx must be a ({batch},) torch tensor of row indices, got {type(idx).__name__}; "
            "pass torch.as_tensor(idx)"
        )
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise AcertError(
            f"idx must hold integer row indices of the training set, got {idx.dtype}; "
            "pass idx.long()"
        )
    if idx.shape != (batch,):
        raise AcertError(
            f"idx must be ({batch},), one row index per sample, got shape {tuple(idx.shape)}"
        )
    if batch and idx.min() < 0:
        raise AcertError(f"idx must hold row indices >= 0, got {idx.min().item()}")


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
