"""Standard training: clean cross-entropy, the accurate end of the trade-off."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from acert.methods.base import Batch, LossTerms, Stateless, Step

__all__ = ["Standard"]


@dataclass
class Standard(Stateless):
    """``CE(f(x), y)``; ignores ε."""

    name: str = "standard"

    def loss(self, model: nn.Sequential, batch: Batch, step: Step) -> LossTerms:
        logits = model(batch.x)
        return LossTerms(F.cross_entropy(logits, batch.y), logits)
