"""Standard training: clean cross-entropy, the accurate end of the trade-off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import nn

from acert.methods.base import Batch, LossTerms, Stateless, Step
from acert.methods.registry import register_method

__all__ = ["Standard"]


@register_method("standard")
@dataclass
class Standard(Stateless):
    """``CE(f(x), y)``; ignores ε."""

    @classmethod
    def from_config(cls, config: Any) -> Standard:
        return cls()

    def loss(self, model: nn.Module, batch: Batch, step: Step) -> LossTerms:
        logits = model(batch.x)
        return LossTerms(F.cross_entropy(logits, batch.y), logits)
