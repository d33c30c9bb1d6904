"""Training-ε ramps as plain functions of the optimisation step
(docs/METHOD.md, "Training loss", 2).

ε is 0 during the first ``stn_epochs`` of standard training, then follows the smoothed ramp of
Shi et al. 2021 over ``reg_epochs`` epochs — a power curve ``α·t^4`` for the first quarter of the
ramp, then linear, joined with equal slope — and stays at ε_max afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EpsSchedule", "smoothed_ramp"]


def smoothed_ramp(t: float, mid: float = 0.25, power: float = 4.0) -> float:
    """Fraction of the final value reached at ramp progress ``t`` in [0, 1].

    ``α·t^power`` on [0, mid] and a line on [mid, 1] ending at 1; α makes the slopes meet:
    ``α = 1 / (mid^(power-1) · (power - (power-1)·mid))``.
    """
    t = min(max(t, 0.0), 1.0)
    alpha = 1.0 / (mid ** (power - 1) * (power - (power - 1) * mid))
    if t <= mid:
        return alpha * t**power
    at_mid = alpha * mid**power
    return at_mid + (1.0 - at_mid) * (t - mid) / (1.0 - mid)


@dataclass(frozen=True)
class EpsSchedule:
    """ε of the training step: 0, then the smoothed ramp to ``eps_max``, then constant.

    Attributes:
        eps_max: final training ε, pixel units.
        steps_per_epoch: optimisation steps in one epoch.
        stn_epochs: epochs of standard training (ε = 0) first.
        reg_epochs: epochs of the ramp (and of the warm-up regularisers).
    """

    eps_max: float
    steps_per_epoch: int
    stn_epochs: float = 1.0
    reg_epochs: float = 20.0

    @property
    def ramp_start(self) -> float:
        return self.stn_epochs * self.steps_per_epoch

    @property
    def ramp_end(self) -> float:
        return (self.stn_epochs + self.reg_epochs) * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        if step < self.ramp_start:
            return 0.0
        if step >= self.ramp_end:
            return self.eps_max
        return self.eps_max * smoothed_ramp(
            (step - self.ramp_start) / (self.ramp_end - self.ramp_start)
        )

    def in_warmup(self, step: int) -> bool:
        """True before the ramp has reached ε_max (epoch < stn_epochs + reg_epochs)."""
        return step < self.ramp_end
