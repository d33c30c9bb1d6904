"""Per-sample certified radius by batched bracketed root finding (METHOD.md, "Certified radius").

For a correctly classified input the certified margin ``m(ε) = min_t lb_t(x, ε)`` is continuous
and non-increasing, so ``r(x) = sup{ε <= ε_max : m(ε) > 0}`` is found by keeping, per sample,
a bracket ``[lo, hi]`` with ``m(lo) > 0`` (certified) and ``m(hi) <= 0``. A search strategy
proposes the next point inside each open bracket: :class:`Brent` (inverse quadratic
interpolation and secant steps, safeguarded by bisection, Brent 1973) or :class:`Bisection`.
Only the samples still open are evaluated, each stops on its own tolerance, and the radius
reported is always ``lo``: a point where the bound was evaluated and certified, never an
interpolated root that could lie past it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from acert.bounds import (
    BatchStats,
    Interval,
    as_eps,
    check_inputs,
    clean_forward,
    ibp,
    input_box,
    margin_bounds_on_box,
)
from acert.bounds.layers import needs_batch_stats
from acert.bounds.spec import other_classes
from acert.errors import AcertError

__all__ = [
    "SEARCHES",
    "Bisection",
    "Bracket",
    "Brent",
    "RadiusResult",
    "certified_radius",
    "clean_margins",
    "radius_search",
]


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

    def select(self, rows: Tensor) -> Bracket:
        return Bracket(
            *(t[rows] for t in (self.lo, self.f_lo, self.hi, self.f_hi, self.prev, self.f_prev)),
            steps=[s[rows] for s in self.steps],
        )


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


SEARCHES = {"brent": Brent, "bisection": Bisection}


@dataclass
class RadiusResult:
    """Certified radii and the cost of finding them; every tensor is (B,).

    Attributes:
        radius: certified radius, pixel units; 0 when misclassified.
        evaluations: bound evaluations spent on each sample.
        converged: False where the iteration limit stopped the search first (the radius is
            still certified, only less tight).
    """

    radius: Tensor
    evaluations: Tensor
    converged: Tensor

    @property
    def mean_evaluations(self) -> float:
        return self.evaluations.float().mean().item()


def clean_margins(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) ``min_t z_y - z_t`` of the logits; positive exactly when the prediction is y."""
    true = logits.gather(1, y.unsqueeze(1))
    return (true - logits.gather(1, other_classes(y, logits.shape[1]))).min(1).values


def radius_search(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    eps_max: float | Tensor,
    method: str = "ibp",
    search: str = "brent",
    xtol: float | None = None,
    rtol: float = 0.0,
    ftol: float = 0.0,
    max_iter: int = 50,
    stats: BatchStats | None = None,
    logits: Tensor | None = None,
) -> RadiusResult:
    """Certified radius of every sample, with the number of bound evaluations spent.

    Args:
        model: a supported ``nn.Sequential`` (see :func:`acert.bounds.margin_bounds`).
        x: (B, ...) inputs in [0, 1].
        y: (B,) labels.
        eps_max: cap of the search, a number or (B,) per-sample caps, pixel units.
        method: bound method, ``"ibp"``, ``"crown-ibp"`` or ``"crown"``.
        search: ``"brent"`` or ``"bisection"``.
        xtol, rtol: a sample stops once ``hi - lo <= xtol + rtol * lo``; xtol defaults to
            1e-4 times the largest cap.
        ftol: a sample also stops at a certified point whose margin bound is <= ftol.
        max_iter: evaluations after the one at the cap.
        stats: clean-batch statistics for train-mode batch-norms (computed when needed).
        logits: the clean logits, when the caller already has them.

    Returns:
        :class:`RadiusResult`; every radius is a point at which the bound certifies the sample.
    """
    check_inputs(model, x, y)
    if search not in SEARCHES:
        raise AcertError(f"unknown radius search {search!r}; choose one of {', '.join(SEARCHES)}")
    cap = as_eps(eps_max, x.shape[0], x)
    with torch.no_grad():
        try:
            if needs_batch_stats(model) and stats is None:
                logits, stats = clean_forward(model, x, update_running_stats=False)
            elif logits is None and needs_batch_stats(model):
                # the clean logits under the given statistics (not those of x's own batch)
                logits = ibp.propagate(model, Interval(x, torch.zeros_like(x)), stats)[0].centre
            elif logits is None:
                logits = model(x)
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0]
            raise AcertError(
                f"input of shape {tuple(x.shape[1:])} does not fit the model: {first_line}"
            ) from err
        return _search(
            model, x, y, cap, method, SEARCHES[search](), xtol, rtol, ftol, max_iter, stats, logits
        )


def _search(
    model, x, y, cap, method, strategy, xtol, rtol, ftol, max_iter, stats, logits
) -> RadiusResult:
    batch = x.shape[0]
    xtol = 1e-4 * cap.max().item() if xtol is None else xtol
    evaluations = torch.zeros(batch, dtype=torch.long, device=x.device)
    converged = torch.ones(batch, dtype=torch.bool, device=x.device)

    def margin_at(rows: Tensor, eps: Tensor) -> Tensor:
        evaluations[rows] += 1
        box = input_box(x[rows], eps)
        return margin_bounds_on_box(model, box, y[rows], method, stats).min(1).values

    f0 = clean_margins(logits, y)
    radius = torch.zeros_like(cap)
    rows = torch.nonzero((f0 > 0) & (cap > 0), as_tuple=True)[0]
    if rows.numel() == 0:
        return RadiusResult(radius, evaluations, converged)
    f_cap = margin_at(rows, cap[rows])
    at_cap = f_cap > 0
    radius[rows[at_cap]] = cap[rows[at_cap]]
    keep = ~at_cap
    rows = rows[keep]
    nan = torch.full_like(f_cap[keep], float("nan"))
    width = cap[rows]
    bracket = Bracket(
        torch.zeros_like(width), f0[rows], cap[rows], f_cap[keep], nan, nan.clone(), [width, width]
    )
    for _ in range(max_iter):
        tol = xtol + rtol * bracket.lo
        open_ = bracket.hi - bracket.lo > tol
        if not open_.any():
            break
        radius[rows[~open_]] = bracket.lo[~open_]
        rows, bracket, tol = rows[open_], bracket.select(open_), tol[open_]
        point = strategy.propose(bracket, tol).clamp(bracket.lo, bracket.hi)
        f_point = margin_at(rows, point)
        _update(bracket, point, f_point)
        done = (f_point > 0) & (f_point <= ftol)
        radius[rows[done]] = point[done]
        rows, bracket = rows[~done], bracket.select(~done)
    else:
        converged[rows[bracket.hi - bracket.lo > xtol + rtol * bracket.lo]] = False
    radius[rows] = bracket.lo
    return RadiusResult(radius, evaluations, converged)


def _update(b: Bracket, point: Tensor, f_point: Tensor) -> None:
    """Move the end of the bracket on the side of ``point``; remember the end it replaces."""
    certified = f_point > 0
    b.prev = torch.where(certified, b.lo, b.hi)
    b.f_prev = torch.where(certified, b.f_lo, b.f_hi)
    b.lo = torch.where(certified, point, b.lo)
    b.f_lo = torch.where(certified, f_point, b.f_lo)
    b.hi = torch.where(certified, b.hi, point)
    b.f_hi = torch.where(certified, b.f_hi, f_point)


def certified_radius(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    eps_max: float | Tensor,
    method: str = "ibp",
    **options: object,
) -> Tensor:
    """(B,) certified radii; see :func:`radius_search` for the options and the cost."""
    return radius_search(model, x, y, eps_max, method, **options).radius
