"""The per-sample brackets of a radius search and the strategies that shrink them.

A bracket ``[lo, hi]`` holds a certified point (``f_lo > 0``) and an uncertified one
(``f_hi <= 0``); a strategy proposes the next point inside each open bracket: :class:`Brent`
(inverse quadratic interpolation and secant steps, safeguarded by bisection, Brent 1973) or
:class:`Bisection`. Everything is batched: every tensor is (B,), one entry per open sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["SEARCHES", "Bisection", "Bracket", "Brent", "Strategy"]


@dataclass
class Bracket:
    """Per-sample search state; every tensor is (B,).

    ``lo`` is certified (``f_lo > 0``) and ``hi`` is not (``f_hi <= 0``). ``prev`` is the
    bracket end replaced by the latest step (NaN before the first), kept for interpolation.
    ``steps`` holds the sizes of the last two steps for Brent's progress safeguard.
    """

    lo: Tensor
    f_lo: Tensor
    hi: Tensor
    f_hi: Tensor
    prev: Tensor
    f_prev: Tensor
    steps: list[Tensor] = field(default_factory=list)

    @staticmethod
    def new(lo: Tensor, f_lo: Tensor, hi: Tensor, f_hi: Tensor) -> Bracket:
        """A fresh bracket: no replaced end yet, and its width as both earlier step sizes."""
        nan = torch.full_like(lo, float("nan"))
        width = hi - lo
        return Bracket(lo, f_lo, hi, f_hi, nan, nan.clone(), [width, width])

    @staticmethod
    def cat(brackets: list[Bracket]) -> Bracket:
        """The brackets of several groups of samples, one after the other."""
        fields = ("lo", "f_lo", "hi", "f_hi", "prev", "f_prev")
        joined = [torch.cat([getattr(b, name) for b in brackets]) for name in fields]
        steps = [torch.cat([b.steps[i] for b in brackets]) for i in range(2)]
        return Bracket(*joined, steps=steps)

    def select(self, rows: Tensor) -> Bracket:
        return Bracket(
            *(t[rows] for t in (self.lo, self.f_lo, self.hi, self.f_hi, self.prev, self.f_prev)),
            steps=[s[rows] for s in self.steps],
        )

    def update(self, point: Tensor, f_point: Tensor) -> None:
        """Move the end on the side of ``point``; remember the end it replaces."""
        certified = f_point > 0
        self.prev = torch.where(certified, self.lo, self.hi)
        self.f_prev = torch.where(certified, self.f_lo, self.f_hi)
        self.lo = torch.where(certified, point, self.lo)
        self.f_lo = torch.where(certified, f_point, self.f_lo)
        self.hi = torch.where(certified, self.hi, point)
        self.f_hi = torch.where(certified, self.f_hi, f_point)


class Strategy(Protocol):
    """Proposes the next point of every open bracket; ``tol`` is each sample's tolerance."""

    name: str

    def propose(self, bracket: Bracket, tol: Tensor) -> Tensor: ...


class Bisection:
    """Halve the bracket: about log2(width / tol) evaluations per sample."""

    name = "bisection"

    def propose(self, bracket: Bracket, tol: Tensor) -> Tensor:
        return (bracket.lo + bracket.hi) / 2


class Brent:
    """Brent's method in bracket form.

    Interpolates the root from the two ends and the last replaced point (inverse quadratic
    interpolation, or the secant when only two points are usable) and accepts the step only
    if it lands in the three quarters of the bracket next to the better end and is less than
    half the step before last; otherwise it bisects. A step never lands closer than tol/2 to
    the better end, so an accurate estimate closes the bracket from both sides in two steps.
    """

    name = "brent"

    def propose(self, bracket: Bracket, tol: Tensor) -> Tensor:
        b = bracket
        lo_is_best = b.f_lo.abs() < b.f_hi.abs()
        best = torch.where(lo_is_best, b.lo, b.hi)
        other = torch.where(lo_is_best, b.hi, b.lo)
        guess = self._interpolate(b)
        reach = guess - best
        toward_other = torch.sign(other - best)
        acceptable = (
            torch.isfinite(guess)
            & (reach * toward_other >= 0)
            & (reach.abs() < 0.75 * (other - best).abs())
            & (reach.abs() < 0.5 * b.steps[-2])
        )
        step = torch.where(acceptable, reach, (other - best) / 2)
        step = torch.where(step.abs() < tol / 2, toward_other * tol / 2, step)
        bisected = ~acceptable
        b.steps = [torch.where(bisected, step.abs(), b.steps[-1]), step.abs()]
        return best + step

    @staticmethod
    def _interpolate(b: Bracket) -> Tensor:
        secant = b.lo - b.f_lo * (b.hi - b.lo) / (b.f_hi - b.f_lo)
        x0, x1, x2 = b.lo, b.hi, b.prev
        f0, f1, f2 = b.f_lo, b.f_hi, b.f_prev
        distinct = torch.isfinite(x2) & (f0 != f2) & (f1 != f2) & (f0 != f1)
        quadratic = (
            x0 * f1 * f2 / ((f0 - f1) * (f0 - f2))
            + x1 * f0 * f2 / ((f1 - f0) * (f1 - f2))
            + x2 * f0 * f1 / ((f2 - f0) * (f2 - f1))
        )
        return torch.where(distinct, quadratic, secant)


SEARCHES: dict[str, type[Strategy]] = {"brent": Brent, "bisection": Bisection}
"""The strategies by name (``SearchSettings.strategy``, config key ``radius_search``)."""
