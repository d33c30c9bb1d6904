"""STAPS (Mao et al. 2023, "TAPS: Connecting certified and adversarial training", NeurIPS;
docs/METHOD.md (M21)):
TAPS on SABR's small box.

1. x_adv by PGD in the clipped ε-ball (eval mode, as for :mod:`acert.methods.sabr`);
2. the box of :func:`acert.methods.sabr.sabr_box` around it, half-width λ·ε (``sabr_lambda``);
3. the TAPS loss of :mod:`acert.methods.taps` on that box, ``L = L_TAPS · L_IBP`` with L_TAPS's
   gradient scaled by w, both terms over the small box; the latent PGD starts from the latent
   point of the box's centre. λ = 1 is TAPS on the whole clipped ball.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from acert.bounds import Interval
from acert.methods.base import Batch
from acert.methods.registry import register_method
from acert.methods.sabr import SABRSettings, sabr_box
from acert.methods.taps import TAPS, TAPSSettings

__all__ = ["STAPS", "STAPSSettings"]


@dataclass(frozen=True)
class STAPSSettings(TAPSSettings, SABRSettings):
    """STAPS's config keys: SABR's λ and TAPS's split and weights."""


@register_method(
    "staps", knobs={"sabr_lambda": "λ", "taps_grad_scale": "w"}, settings=STAPSSettings
)
@dataclass
class STAPS(TAPS):
    """TAPS on the small box of SABR around a PGD point; L_std and the warm-up regularisers
    while ε_s = 0.

    Attributes:
        lam: λ, the box radius as a fraction of ε (``sabr_lambda``).
        head, grad_scale, connector, regularizer: as for :class:`acert.methods.taps.TAPS`.
        attack: the PGD that finds the box centre; its steps and restarts also drive the
            latent PGD.
    """

    lam: float = 0.4

    @classmethod
    def from_config(cls, config: Any) -> STAPS:
        return cls(lam=STAPSSettings.read(config).sabr_lambda, **cls.config_knobs(config))

    def box(self, model: nn.Module, batch: Batch, eps: float | Tensor) -> tuple[Interval, Tensor]:
        """SABR's box around a PGD point of the ε-ball, and its centre."""
        x_adv = self.attack(model, batch.x, batch.y, eps)
        box = sabr_box(batch.x, x_adv, eps, self.lam)
        return box, box.centre
