"""What an export writes (:class:`PropertySettings`), checked when the object is made, and the
check of :func:`acert.export.export_run`'s settings objects."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from acert.certify_runs import DataSelection, check_selection
from acert.errors import AcertError

__all__ = ["DEFAULT_TIMEOUT", "PropertySettings", "check_export_settings"]

DEFAULT_TIMEOUT = 120.0
"""Seconds per instance written to instances.csv unless ``timeout`` is given."""


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
        eps, n, timeout = self.eps, self.n, self.timeout
        if not (_is_real(eps) and 0 < eps < 1):  # False for NaN
            raise AcertError(f"eps must lie in (0, 1) pixel units, got {eps!r}")
        if not (_is_whole(n) and n > 0):
            raise AcertError(f"n must be a positive whole number of properties, got {n!r}")
        if not _is_whole(self.seed):
            raise AcertError(f"seed must be a whole number, got {self.seed!r}")
        if not (_is_real(timeout) and 0 < timeout < math.inf):
            raise AcertError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(self.only_correct, bool):
            raise AcertError(f"only_correct must be True or False, got {self.only_correct!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_export_settings(properties: PropertySettings, data: DataSelection) -> None:
    """A one-line :class:`AcertError` unless ``properties`` and ``data`` are the settings
    objects, ``data`` without a subset limit beside ``properties.n``."""
    if not isinstance(properties, PropertySettings):
        raise AcertError(
            f"properties must be an acert.export.PropertySettings, got "
            f"{type(properties).__name__}; e.g. PropertySettings(eps=0.1, n=10)"
        )
    if check_selection(data).limit is not None:
        raise AcertError(
            f"an export draws properties.n inputs itself; leave data.limit at None, "
            f"got {data.limit}"
        )
