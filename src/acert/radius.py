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

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from acert.bounds import (
    BatchStats,
    as_eps,
    check_eps,
    check_inputs,
    input_box,
    margin_evaluator,
)
from acert.bounds.layers import (
    check_fixed_normalisation,
    forward_with_stats,
    needs_batch_stats,
)
from acert.bounds.spec import other_classes
from acert.errors import AcertError

__all__ = [
    "SAFETY_MARGIN",
    "SEARCHES",
    "Bisection",
    "Bracket",
    "Brent",
    "RadiusResult",
    "certified_radius",
    "check_cap",
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

SAFETY_MARGIN = 1e-6
"""A radius is reported only where the margin bound exceeds this fraction of the sample's
largest clean logit (in magnitude): the same bound recomputed on another float path (another
batch, another chunking, another kernel) differs by rounding, and a root finder otherwise stops
where the bound is ~1e-8, which such a recomputation need not certify. It costs a radius about
a millionth of its length."""


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
    guess: Tensor | None = None,
    spread: float = 0.02,
    sound: bool = True,
) -> RadiusResult:
    """Certified radius of every sample, with the number of bound evaluations spent.

    Args:
        model: a supported ``nn.Sequential`` (see :func:`acert.bounds.margin_bounds`).
        x: (B, ...) inputs in [0, 1], a torch tensor (see :func:`acert.bounds.check_inputs`).
        y: (B,) int64 labels.
        eps_max: cap of the search, pixel units: a number in (0, 1], or (B,) per-sample caps
            in [0, 1] (a cap of 0 gives that sample radius 0). Pixels lie in [0, 1], so a
            larger cap means nothing and is refused, as are NaN and inf.
        method: bound method, ``"ibp"``, ``"crown-ibp"`` or ``"crown"``.
        search: ``"brent"`` or ``"bisection"``.
        xtol, rtol: a sample stops once ``hi - lo <= xtol + rtol * lo``; xtol (> 0) defaults
            to 1e-4 times the largest cap, rtol must be >= 0; both finite.
        ftol: a sample also stops at a certified point whose margin bound is <= ftol (>= 0).
        max_iter: evaluations after the one at the cap (>= 0).
        stats: clean-batch statistics for train-mode batch-norms (computed when needed).
        logits: (B, K) the clean logits, when the caller already has them.
        guess: (B,) a radius expected to be close (e.g. the sample's radius one epoch ago);
            where it lies in (0, cap) the search starts with a bracket around it, two
            evaluations at the guess and ``guess·(1 ± spread)``, instead of one at the cap.
            Every bracket end is evaluated, so a wrong guess costs time, never soundness.
        spread: relative distance of the second probe of a warm start, in (0, 1).
        sound: bounds widened for floating-point rounding; False (a training objective's
            radii, not certificates) uses the plain arithmetic, about 20% cheaper.

    Returns:
        :class:`RadiusResult`; every radius is a point at which the bound certifies the sample.
    """
    _check_search_arguments(
        model, x, y, eps_max, search, xtol, rtol, ftol, max_iter, logits, guess, spread
    )
    cap = as_eps(eps_max, x.shape[0], x)
    with torch.no_grad():
        logits, stats = _clean_pass(model, x, stats, logits)
        xtol = 1e-4 * cap.max().item() if xtol is None else xtol
        floor = SAFETY_MARGIN * logits.abs().amax(1)
        state = _Search(model, x, y, cap, method, stats, xtol, rtol, ftol, floor, sound)
        f0 = clean_margins(logits, y) - floor
        return state.run(f0, guess, spread, SEARCHES[search](), max_iter)


def _check_search_arguments(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    eps_max: object,
    search: object,
    xtol: object,
    rtol: object,
    ftol: object,
    max_iter: object,
    logits: object,
    guess: object,
    spread: object,
) -> None:
    """Every argument of :func:`radius_search`, checked before any work: a one-line
    :class:`AcertError` naming the argument and the fix."""
    check_inputs(model, x, y)
    if search not in SEARCHES:
        raise AcertError(f"unknown radius search {search!r}; choose one of {', '.join(SEARCHES)}")
    check_cap(eps_max, x.shape[0])
    for name, value, positive in (
        ("xtol", xtol, True),
        ("rtol", rtol, False),
        ("ftol", ftol, False),
    ):
        if name == "xtol" and value is None:  # the default, from the cap
            continue
        valid = _is_number(value) and math.isfinite(value)
        if not (valid and (value > 0 if positive else value >= 0)):
            least = "> 0" if positive else ">= 0"
            raise AcertError(f"{name} must be a finite number {least}, got {value!r}")
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 0:
        raise AcertError(f"max_iter must be a whole number >= 0, got {max_iter!r}")
    if not _is_number(spread) or not 0 < spread < 1:
        raise AcertError(
            f"spread must lie in (0, 1), the relative distance of a warm start's second "
            f"probe from the guess, got {spread!r}"
        )
    batch, classes = x.shape[0], model[-1].out_features
    if logits is not None and (
        not isinstance(logits, Tensor) or tuple(logits.shape) != (batch, classes)
    ):
        raise AcertError(
            f"logits must be the ({batch}, {classes}) clean logits of x, got {_shape(logits)}; "
            "pass model(x) or leave logits out"
        )
    if guess is not None and (
        not isinstance(guess, Tensor) or tuple(guess.shape) != (batch,) or guess.is_complex()
    ):
        raise AcertError(
            f"guess must be a ({batch},) tensor of radii, one per sample, got {_shape(guess)}"
        )


def check_cap(eps_max: object, batch: int | None, name: str = "eps_max") -> None:
    """One-line :class:`AcertError` unless ``eps_max`` is a cap of a radius search: a number in
    (0, 1], or (with a ``batch``) (B,) per-sample caps in [0, 1]. Pixels lie in [0, 1]: a larger
    cap means nothing, and one of inf or NaN would give every radius 0."""
    check_eps(eps_max, name)
    if isinstance(eps_max, Tensor) and eps_max.dim() > 0:
        if batch is None or tuple(eps_max.shape) != (batch,):
            shape = "" if batch is None else f" or a ({batch},) tensor of per-sample caps"
            raise AcertError(f"{name} must be a number{shape}, got shape {tuple(eps_max.shape)}")
        caps = eps_max.double()
        bad = ~(torch.isfinite(caps) & (caps >= 0) & (caps <= 1))
        if bad.any():
            raise AcertError(
                f"per-sample {name} must lie in [0, 1] pixel units (pixels lie in [0, 1]), "
                f"got {caps[bad][0].item():g} for sample {bad.nonzero()[0, 0].item()}"
            )
        return
    value = float(eps_max)
    if not 0 < value <= 1:  # False for NaN
        raise AcertError(
            f"{name} must lie in (0, 1] pixel units (pixels lie in [0, 1]), got {value:g}"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shape(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__


def _clean_pass(
    model: nn.Sequential, x: Tensor, stats: BatchStats | None, logits: Tensor | None
) -> tuple[Tensor, BatchStats | None]:
    """The clean logits of x and the batch-norm statistics the bounds use (a batch-norm that
    normalises with the current batch needs them given: no radius is a certificate of it), or
    a one-line error for a misfit input."""
    if stats is None:
        check_fixed_normalisation(model)
    try:
        if logits is None and needs_batch_stats(model):
            # the clean logits under the given statistics (not those of x's own batch)
            return forward_with_stats(model, x, stats), stats
        return (model(x) if logits is None else logits), stats
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise AcertError(
            f"input of shape {tuple(x.shape[1:])} does not fit the model: {first_line}"
        ) from err


class _Search:
    """One radius search over a batch: the bound evaluations and the per-sample results."""

    def __init__(self, model, x, y, cap, method, stats, xtol, rtol, ftol, floor, sound) -> None:
        self.x, self.y, self.cap = x, y, cap
        self.margins = margin_evaluator(model, method, stats, sound)
        self.xtol, self.rtol, self.ftol, self.floor = xtol, rtol, ftol, floor
        self.radius = torch.zeros_like(cap)
        self.evaluations = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.converged = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def margin_at(self, rows: Tensor, eps: Tensor) -> Tensor:
        """(R,) certified margin ``m(eps)`` of the given rows less their safety floor (a point
        counts as certified where this is > 0); counts one evaluation each."""
        self.evaluations[rows] += 1
        bounds = self.margins(input_box(self.x[rows], eps), self.y[rows])
        return bounds.min(1).values - self.floor[rows]

    def tol(self, lo: Tensor) -> Tensor:
        return self.xtol + self.rtol * lo

    def cold_brackets(self, rows: Tensor, f0: Tensor) -> tuple[Tensor, Bracket]:
        """Evaluate at the cap; the uncertified rows get the bracket [0, cap]."""
        cap = self.cap[rows]
        f_cap = self.margin_at(rows, cap)
        at_cap = f_cap > 0
        self.radius[rows[at_cap]] = cap[at_cap]
        keep = ~at_cap
        return rows[keep], _bracket(torch.zeros_like(cap[keep]), f0[keep], cap[keep], f_cap[keep])

    def warm_brackets(
        self, rows: Tensor, f0: Tensor, guess: Tensor, spread: float
    ) -> tuple[Tensor, Bracket]:
        """Bracket the radius near a guess below the cap: evaluate the guess, then one probe
        ``spread`` (relative) beyond it on the side the guess fell; fall back to the cap or 0."""
        f_guess = self.margin_at(rows, guess)
        above = f_guess > 0
        probe = torch.where(
            above, (guess * (1 + spread)).minimum(self.cap[rows]), guess * (1 - spread)
        )
        f_probe = self.margin_at(rows, probe)
        probe_certified = f_probe > 0
        pieces = []
        # certified at the guess, not at the probe: [guess, probe]
        sel = above & ~probe_certified
        pieces.append((rows[sel], _bracket(guess[sel], f_guess[sel], probe[sel], f_probe[sel])))
        # certified at both: the cap decides (or the probe already is the cap)
        sel = above & probe_certified
        capped = sel & (probe >= self.cap[rows])
        self.radius[rows[capped]] = self.cap[rows[capped]]
        sel = sel & ~capped
        if sel.any():
            cap_rows, cap_bracket = self.cold_brackets(rows[sel], f0[sel])
            kept = torch.isin(rows[sel], cap_rows)
            lo, f_lo = probe[sel][kept], f_probe[sel][kept]
            pieces.append((cap_rows, _bracket(lo, f_lo, cap_bracket.hi, cap_bracket.f_hi)))
        # not certified at the guess: [probe, guess] if the probe is certified, else [0, probe]
        sel = ~above & probe_certified
        pieces.append((rows[sel], _bracket(probe[sel], f_probe[sel], guess[sel], f_guess[sel])))
        sel = ~above & ~probe_certified
        zero = torch.zeros_like(probe[sel])
        pieces.append((rows[sel], _bracket(zero, f0[sel], probe[sel], f_probe[sel])))
        return torch.cat([r for r, _ in pieces]), Bracket.cat([b for _, b in pieces])

    def run(
        self, f0: Tensor, guess: Tensor | None, spread: float, strategy, max_iter: int
    ) -> RadiusResult:
        """Bracket every open sample (cold at the cap, or warm around its guess), then refine.

        Args:
            f0: (B,) margin at ε = 0 less the floor; the open samples are those above 0.
        """
        open_ = (f0 > 0) & (self.cap > 0)
        warm = torch.zeros_like(open_)
        if guess is not None:
            guess = guess.to(self.cap)
            warm = open_ & torch.isfinite(guess) & (guess > 0) & (guess < self.cap)
        rows = torch.nonzero(open_ & ~warm, as_tuple=True)[0]
        pieces = [self.cold_brackets(rows, f0[rows])] if rows.numel() else []
        rows = torch.nonzero(warm, as_tuple=True)[0]
        if rows.numel():
            pieces.append(self.warm_brackets(rows, f0[rows], guess[rows], spread))
        if pieces:
            rows = torch.cat([r for r, _ in pieces])
            self.refine(rows, Bracket.cat([b for _, b in pieces]), strategy, max_iter)
        return RadiusResult(self.radius, self.evaluations, self.converged)

    def refine(self, rows: Tensor, bracket: Bracket, strategy, max_iter: int) -> None:
        """Shrink every bracket below its tolerance (or stop at max_iter); report ``lo``."""
        for _ in range(max_iter):
            tol = self.tol(bracket.lo)
            open_ = bracket.hi - bracket.lo > tol
            if not open_.any():
                break
            self.radius[rows[~open_]] = bracket.lo[~open_]
            rows, bracket, tol = rows[open_], bracket.select(open_), tol[open_]
            point = strategy.propose(bracket, tol).clamp(bracket.lo, bracket.hi)
            f_point = self.margin_at(rows, point)
            _update(bracket, point, f_point)
            done = (f_point > 0) & (f_point <= self.ftol)
            self.radius[rows[done]] = point[done]
            rows, bracket = rows[~done], bracket.select(~done)
        else:
            self.converged[rows[bracket.hi - bracket.lo > self.tol(bracket.lo)]] = False
        self.radius[rows] = bracket.lo


def _bracket(lo: Tensor, f_lo: Tensor, hi: Tensor, f_hi: Tensor) -> Bracket:
    nan = torch.full_like(lo, float("nan"))
    width = hi - lo
    return Bracket(lo, f_lo, hi, f_hi, nan, nan.clone(), [width, width])


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
