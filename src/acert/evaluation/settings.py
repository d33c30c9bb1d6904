"""What an evaluation computes and how (:class:`EvaluationSettings`), with the rules of its
values, and the name of a best-of certificate (:func:`best_label`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from acert.bounds import METHODS, check_eps, crown
from acert.foundation.errors import AcertError
from acert.foundation.ranges import PGD_STEPS, OneOf, above, at_least, between, settings_object
from acert.radius import check_cap

__all__ = [
    "BATCH_SIZE",
    "BOUND",
    "CROWN_MEMORY_MIB",
    "RADIUS",
    "EvaluationSettings",
    "best_label",
    "check_settings",
]

RADIUS = between(0, 1, low_open=True, unit="pixel units")
"""A radius of the certified or PGD accuracy."""

BOUND = OneOf(lambda: sorted(METHODS))
"""A bound that certifies (:data:`acert.bounds.METHODS`; config key ``eval_bound``)."""


BATCH_SIZE = at_least(1, whole=True)
"""Samples per bound pass of an evaluation."""

CROWN_MEMORY_MIB = above(0, null="no cap")
"""Cap of each CROWN backward chunk's coefficients, MiB."""


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation computes and how; a bad value is refused here, when the object is made.

    Attributes:
        eps_max: cap of the radius search and of the ACR, a number in (0, 1].
        cert_eps: radii at which the certified accuracy is reported, each in (0, 1]; kept as a
            tuple, a radius given twice once.
        bounds: ``"ibp"``, ``"crown-ibp"`` or ``"crown"``, or several of them (a tuple; one
            name alone is taken as a tuple of one): then each sample's radius is the largest
            of the bounds' radii (each is sound, so their maximum is) and a sample is
            certified at ε when any of the bounds certifies it.
        pgd_eps: radii for the PGD accuracy, each in (0, 1] (None: ``cert_eps``; ``()``: none).
        pgd_steps: PGD steps (one random restart), >= 0; 0 skips the attack.
        batch_size: samples per bound pass, >= 1.
        crown_memory_mib: cap of each CROWN backward chunk's coefficients in MiB (> 0), or
            None: no cap (:func:`acert.bounds.crown.memory_budget`).
        cascade: with several bounds, search each later bound only where it can raise the
            radius (:func:`cascade_radii`): on the samples the earlier bounds leave below the
            cap, from the radius they reached. Each sample's radius is the same best-of (up to
            the search's tolerance) at a fraction of the cost; a bound's own radii
            (``bound_radii``) are then those it added, 0 where it was not searched.
    """

    eps_max: float
    cert_eps: tuple[float, ...] = ()
    bounds: tuple[str, ...] = ("ibp",)
    pgd_eps: tuple[float, ...] | None = None
    pgd_steps: int = 20
    batch_size: int = 256
    crown_memory_mib: float | None = None
    cascade: bool = False

    def __post_init__(self) -> None:
        check_cap(self.eps_max, None)
        object.__setattr__(self, "cert_eps", _radii(self.cert_eps, "cert_eps"))
        object.__setattr__(self, "bounds", _bound_names(self.bounds))
        if self.pgd_eps is not None:
            object.__setattr__(self, "pgd_eps", _radii(self.pgd_eps, "pgd_eps"))
        PGD_STEPS.check(self.pgd_steps, "pgd_steps")
        BATCH_SIZE.check(self.batch_size, "batch_size")
        CROWN_MEMORY_MIB.check(self.crown_memory_mib, "crown_memory_mib")
        if not isinstance(self.cascade, bool):
            raise AcertError(f"cascade must be True or False, got {self.cascade!r}")

    @property
    def label(self) -> str:
        """The name of the certificate (:func:`best_label` of ``bounds``)."""
        return best_label(self.bounds)

    def memory_budget(self, x: Tensor) -> contextlib.AbstractContextManager[None]:
        """The CROWN memory cap for inputs like ``x`` (a no-op without ``crown_memory_mib``)."""
        if self.crown_memory_mib is None:
            return contextlib.nullcontext()
        return crown.memory_budget(max(1, int(self.crown_memory_mib * 2**20 / x.element_size())))


def _radii(values: object, name: str) -> tuple[float, ...]:
    """``values`` as a tuple of radii in (0, 1], each once."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise AcertError(f"{name} must be a sequence of radii such as (0.1, 0.2), got {values!r}")
    radii = tuple(values)
    for eps in radii:
        check_eps(eps, name)
        if isinstance(eps, Tensor) and eps.numel() != 1:
            raise AcertError(
                f"{name} holds a tensor of shape {tuple(eps.shape)}; pass one number per radius"
            )
        RADIUS.check(float(eps), name)
    return tuple(dict.fromkeys(radii))


def _bound_names(bounds: object) -> tuple[str, ...]:
    """``bounds`` as a tuple of bound names, each once."""
    names = (bounds,) if isinstance(bounds, str) else bounds
    if not isinstance(names, Iterable) or not (names := tuple(names)):
        raise AcertError(f"bounds must name one or more of {', '.join(METHODS)}, got {bounds!r}")
    for name in names:
        BOUND.check(name, "bound")
    return tuple(dict.fromkeys(names))


def check_settings(value: object) -> EvaluationSettings:
    """``value`` if it is an :class:`EvaluationSettings`, else a one-line :class:`AcertError`."""
    return settings_object(
        value,
        EvaluationSettings,
        "settings",
        "acert.evaluation.evaluate.EvaluationSettings",
        "e.g. EvaluationSettings(eps_max=0.1, cert_eps=(0.1,))",
    )


def best_label(bounds: Sequence[str]) -> str:
    """The name of a best-of certificate: ``"best"`` over every bound of
    :data:`acert.bounds.METHODS`, else ``"best-ibp+crown"`` and the like."""
    if len(bounds) == 1:
        return bounds[0]
    if set(bounds) == set(METHODS):
        return "best"
    return "best-" + "+".join(bounds)
