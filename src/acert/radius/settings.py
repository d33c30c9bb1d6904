"""How a radius search runs: one frozen settings object, checked once when it is made.

:data:`EVALUATION_SEARCH` is the search that certifies (docs/METHOD.md, "Certified radius") and the
default of :func:`acert.radius.radius_search`; :data:`TRAINING_SEARCH` is the cheap one of ACERT's
training radii (docs/METHOD.md, "Step 3").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from acert.foundation.errors import AcertError
from acert.foundation.ranges import OneOf, settings_object
from acert.radius.strategies import SEARCHES

__all__ = [
    "EVALUATION_SEARCH",
    "STRATEGY",
    "TRAINING_SEARCH",
    "SearchSettings",
    "check_settings",
]

STRATEGY = OneOf(tuple(SEARCHES))
"""The strategies of a radius search (:data:`acert.radius.SEARCHES`; config key
``radius_search``)."""


@dataclass(frozen=True)
class SearchSettings:
    """The settings of a radius search; a bad value is refused here, when the object is made.

    Attributes:
        strategy: ``"brent"`` or ``"bisection"`` (:data:`acert.radius.SEARCHES`).
        xtol, rtol: a sample stops once ``hi - lo <= xtol + rtol * lo``. xtol (> 0) defaults
            (None) to 1e-4 times the largest cap of the search; rtol >= 0; both finite.
        ftol: a sample also stops at a certified point whose margin bound is <= ftol (>= 0).
        max_iter: evaluations after the first bracket (the one at the cap), >= 0.
        spread: relative distance of a warm start's second probe from the guess, in (0, 1)
            (see :class:`acert.radius.KnownBatch`).
        sound: bounds widened for floating-point rounding; False (a training objective's
            radii, not certificates) uses the plain arithmetic, about 20% cheaper.
    """

    strategy: str = "brent"
    xtol: float | None = None
    rtol: float = 0.0
    ftol: float = 0.0
    max_iter: int = 50
    spread: float = 0.02
    sound: bool = True

    def __post_init__(self) -> None:
        STRATEGY.check(self.strategy, "radius search")
        if self.xtol is not None and not (_is_finite(self.xtol) and self.xtol > 0):
            raise AcertError(f"xtol must be a finite number > 0 (or None), got {self.xtol!r}")
        if not (_is_finite(self.rtol) and self.rtol >= 0):
            raise AcertError(f"rtol must be a finite number >= 0, got {self.rtol!r}")
        if not (_is_finite(self.ftol) and self.ftol >= 0):
            raise AcertError(f"ftol must be a finite number >= 0, got {self.ftol!r}")
        whole = isinstance(self.max_iter, numbers.Integral) and not isinstance(self.max_iter, bool)
        if not (whole and self.max_iter >= 0):
            raise AcertError(f"max_iter must be a whole number >= 0, got {self.max_iter!r}")
        if not (_is_finite(self.spread) and 0 < self.spread < 1):
            raise AcertError(
                f"spread must lie in (0, 1), the relative distance of a warm start's second "
                f"probe from the guess, got {self.spread!r}"
            )
        if not isinstance(self.sound, bool):
            raise AcertError(
                f"sound must be True (certificates) or False (training radii), got {self.sound!r}"
            )


def check_settings(value: object, name: str = "settings") -> SearchSettings:
    """``value`` if it is a :class:`SearchSettings`, else a one-line :class:`AcertError`."""
    return settings_object(
        value,
        SearchSettings,
        name,
        "acert.radius.SearchSettings",
        "e.g. SearchSettings(strategy='bisection', max_iter=10)",
    )


def _is_finite(value: object) -> bool:
    """A real number (not a bool), finite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


EVALUATION_SEARCH = SearchSettings()
"""The search that certifies: Brent, xtol 1e-4 times the cap, rtol = ftol = 0, at most 50
evaluations after the one at the cap, sound bounds (docs/METHOD.md, "Certified radius")."""

TRAINING_SEARCH = SearchSettings(xtol=1e-6, rtol=1e-4, ftol=1e-5, max_iter=10, sound=False)
"""ACERT's training radii (docs/METHOD.md, "Step 3"): Brent, at most 10 evaluations after the one at
the cap, xtol 1e-6, rtol 1e-4, ftol 1e-5, plain arithmetic (a training target, not a
certificate). Warm starts come from :class:`acert.methods.acert.RadiusMemory` (``ACERT.memory``,
config ``radius_warm_start``), with the default spread 0.02."""
