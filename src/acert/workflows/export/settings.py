"""What an export writes (:class:`PropertySettings`), checked when the object is made, and the
check of :func:`acert.workflows.export.run.export_run`'s settings objects."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from acert.foundation.errors import AcertError
from acert.foundation.ranges import above, at_least, between, settings_object
from acert.workflows.certify.runs import DataSelection, check_selection

__all__ = [
    "DEFAULT_TIMEOUT",
    "EPS",
    "PROPERTIES",
    "TIMEOUT",
    "PropertySettings",
    "check_export_settings",
]

DEFAULT_TIMEOUT = 120.0
"""Seconds per instance written to instances.csv unless ``timeout`` is given."""

EPS = between(0, 1, low_open=True, high_open=True, unit="pixel units")
"""The ℓ∞ radius of the exported properties."""

PROPERTIES = at_least(1, whole=True, why="properties to write")
"""How many properties an export writes."""

TIMEOUT = above(0, why="seconds per instance")
"""The per-instance timeout written to instances.csv."""


@dataclass(frozen=True)
class PropertySettings:
    """Which properties an export writes; a bad value is refused when the object is made.

    Attributes:
        eps: ℓ∞ radius in pixel units, 0 < eps < 1.
        n: number of properties, >= 1 (and at most the size of the split).
        seed: seed of the stratified draw.
        timeout: seconds per instance written to instances.csv, > 0.
        only_correct: draw only from inputs the model classifies correctly.
    """

    eps: float
    n: int
    seed: int = 0
    timeout: float = DEFAULT_TIMEOUT
    only_correct: bool = False

    def __post_init__(self) -> None:
        EPS.check(self.eps, "eps")
        PROPERTIES.check(self.n, "n")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise AcertError(f"seed must be a whole number, got {self.seed!r}")
        TIMEOUT.check(self.timeout, "timeout")
        if not isinstance(self.only_correct, bool):
            raise AcertError(f"only_correct must be True or False, got {self.only_correct!r}")


def check_export_settings(properties: PropertySettings, data: DataSelection) -> None:
    """A one-line :class:`AcertError` unless ``properties`` and ``data`` are the settings
    objects, ``data`` without a subset limit beside ``properties.n``."""
    settings_object(
        properties,
        PropertySettings,
        "properties",
        "acert.workflows.export.run.PropertySettings",
        "e.g. PropertySettings(eps=0.1, n=10)",
    )
    if check_selection(data).limit is not None:
        raise AcertError(
            f"an export draws properties.n inputs itself; leave data.limit at None, "
            f"got {data.limit}"
        )
