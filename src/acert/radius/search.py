"""The radius search itself: one batched bracketed root finding per batch (docs/METHOD.md,
"Certified radius"); its strategies are in :mod:`acert.radius.strategies`, its settings in
:mod:`acert.radius.settings`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from acert.bounds import (
    BatchStats,
    MarginEvaluator,
    as_eps,
    check_arithmetic,
    check_eps,
    check_inputs,
    input_box,
    margin_evaluator,
)
from acert.bounds.arithmetic import ieee_arithmetic
from acert.bounds.clean_pass import (
    check_fixed_normalisation,
    forward_with_stats,
    needs_batch_stats,
)
from acert.bounds.spec import other_classes
from acert.bounds.tracing import last_layer
from acert.foundation.errors import AcertError
from acert.foundation.ranges import settings_object
from acert.radius.known import KnownBatch
from acert.radius.settings import EVALUATION_SEARCH, SearchSettings, check_settings
from acert.radius.strategies import SEARCHES, Bracket, Strategy

__all__ = [
    "SAFETY_MARGIN",
    "RadiusResult",
    "certified_radius",
    "check_cap",
    "clean_margins",
    "radius_search",
]


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
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_max: float | Tensor,
    method: str = "ibp",
    settings: SearchSettings = EVALUATION_SEARCH,
    *,
    known: KnownBatch | None = None,
) -> RadiusResult:
    """Certified radius of every sample, with the number of bound evaluations spent.

    Args:
        model: a supported model (see :func:`acert.bounds.margin_bounds`).
        x: (B, ...) inputs in [0, 1], a torch tensor (see :func:`acert.bounds.check_inputs`).
        y: (B,) int64 labels.
        eps_max: cap of the search, pixel units: a number in (0, 1], or (B,) per-sample caps
            in [0, 1] (a cap of 0 gives that sample radius 0). Pixels lie in [0, 1], so a
            larger cap means nothing and is refused, as are NaN and inf.
        method: bound method, ``"ibp"``, ``"crown-ibp"`` or ``"crown"``.
        settings: strategy, tolerances, iteration limit, warm-start spread and soundness
            (:class:`SearchSettings`; :data:`TRAINING_SEARCH` is ACERT's cheap one).
        known: the batch's clean logits, batch-norm statistics and warm-start guesses, where
            the caller has them (:class:`KnownBatch`).

    Returns:
        :class:`RadiusResult`; every radius is a point at which the bound certifies the sample.
    """
    known = KnownBatch() if known is None else known
    model = _check_search_arguments(model, x, y, eps_max, settings, known)
    cap = as_eps(eps_max, x.shape[0], x)
    if known.stats is None or settings.sound:
        # a certificate holds only where the statistics fix every batch-norm (and no Dropout
        # draws); a training search may bound the function its clean batch's statistics fix
        check_fixed_normalisation(model, known.stats)
    if settings.sound:
        check_arithmetic()
    # certificates in the arithmetic their allowances assume (training's plain search: any)
    arithmetic = ieee_arithmetic(x.dtype, x.device) if settings.sound else contextlib.nullcontext()
    with torch.no_grad(), arithmetic:
        logits, stats = _clean_pass(model, x, known.stats, known.logits)
        floor = SAFETY_MARGIN * logits.abs().amax(1)
        margins = margin_evaluator(model, method, stats, settings.sound)
        state = _Search(margins, x, y, cap, floor, settings)
        return state.run(
            clean_margins(logits, y) - floor, known.guess, known.beat, known.cap_margin
        )


def _check_search_arguments(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_max: object,
    settings: object,
    known: object,
) -> nn.Module:
    """Every argument of :func:`radius_search`, checked before any work (the settings checked
    themselves when made): a one-line :class:`AcertError` naming the argument and the fix.
    Returns the model's bounds form (:func:`acert.bounds.bounds_form`)."""
    model = check_inputs(model, x, y, runs=False)  # the clean pass runs the model (or gave logits)
    check_settings(settings)
    check_cap(eps_max, x.shape[0])
    settings_object(
        known,
        KnownBatch,
        "known",
        "acert.radius.KnownBatch",
        "e.g. KnownBatch(logits=model(x)), or leave it out",
    )
    known.check(x.shape[0], last_layer(model).out_features)
    return model


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


def _clean_pass(
    model: nn.Module, x: Tensor, stats: BatchStats | None, logits: Tensor | None
) -> tuple[Tensor, BatchStats | None]:
    """The clean logits of x and the batch-norm statistics the bounds use, or a one-line error
    for a misfit input."""
    try:
        if logits is None and needs_batch_stats(model):
            # the clean logits under the given statistics (not those of x's own batch)
            return forward_with_stats(model, x, stats), stats
        return (model(x) if logits is None else logits), stats
    except (RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise AcertError(
            f"input of shape {tuple(x.shape[1:])} does not fit the model: {first_line}"
        ) from err


class _Search:
    """One radius search over a batch: the bound evaluations and the per-sample results."""

    def __init__(
        self,
        margins: MarginEvaluator,
        x: Tensor,
        y: Tensor,
        cap: Tensor,
        floor: Tensor,
        settings: SearchSettings,
    ) -> None:
        """``margins`` is the bound of the search's model and method; ``floor`` (B,) each
        sample's safety floor; xtol None in ``settings`` is 1e-4 times the largest cap."""
        self.x, self.y, self.cap, self.floor = x, y, cap, floor
        self.margins, self.settings = margins, settings
        self.xtol = 1e-4 * cap.max().item() if settings.xtol is None else settings.xtol
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
        return self.xtol + self.settings.rtol * lo

    def cold_brackets(
        self, rows: Tensor, f0: Tensor, f_cap: Tensor | None = None
    ) -> tuple[Tensor, Bracket]:
        """Evaluate at the cap (unless ``f_cap`` gives the margins there); the uncertified rows
        get the bracket [0, cap]."""
        cap = self.cap[rows]
        if f_cap is None:
            f_cap = self.margin_at(rows, cap)
        at_cap = f_cap > 0
        self.radius[rows[at_cap]] = cap[at_cap]
        keep = ~at_cap
        return rows[keep], Bracket.new(
            torch.zeros_like(cap[keep]), f0[keep], cap[keep], f_cap[keep]
        )

    def warm_brackets(self, rows: Tensor, f0: Tensor, guess: Tensor) -> tuple[Tensor, Bracket]:
        """Bracket the radius near a guess below the cap: evaluate the guess, then one probe
        ``spread`` (relative) beyond it on the side the guess fell; fall back to the cap or 0."""
        spread = self.settings.spread
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
        pieces.append((rows[sel], Bracket.new(guess[sel], f_guess[sel], probe[sel], f_probe[sel])))
        # certified at both: the cap decides (or the probe already is the cap)
        sel = above & probe_certified
        capped = sel & (probe >= self.cap[rows])
        self.radius[rows[capped]] = self.cap[rows[capped]]
        sel = sel & ~capped
        if sel.any():
            cap_rows, cap_bracket = self.cold_brackets(rows[sel], f0[sel])
            kept = torch.isin(rows[sel], cap_rows)
            lo, f_lo = probe[sel][kept], f_probe[sel][kept]
            pieces.append((cap_rows, Bracket.new(lo, f_lo, cap_bracket.hi, cap_bracket.f_hi)))
        # not certified at the guess: [probe, guess] if the probe is certified, else [0, probe]
        sel = ~above & probe_certified
        pieces.append((rows[sel], Bracket.new(probe[sel], f_probe[sel], guess[sel], f_guess[sel])))
        sel = ~above & ~probe_certified
        zero = torch.zeros_like(probe[sel])
        pieces.append((rows[sel], Bracket.new(zero, f0[sel], probe[sel], f_probe[sel])))
        return torch.cat([r for r, _ in pieces]), Bracket.cat([b for _, b in pieces])

    def beat_brackets(self, rows: Tensor, f0: Tensor, beat: Tensor) -> tuple[Tensor, Bracket]:
        """Evaluate one tolerance above ``beat``: a row not certified there keeps radius 0 (the
        caller's radius is as good to the search's tolerance); a certified row is bracketed on
        [that point, cap] (or is at the cap)."""
        beat = (beat + self.tol(beat)).minimum(self.cap[rows])
        f_beat = self.margin_at(rows, beat)
        certified = f_beat > 0
        rows, f0, beat, f_beat = rows[certified], f0[certified], beat[certified], f_beat[certified]
        if rows.numel() == 0:  # no bound evaluation on an empty batch
            return rows, Bracket.new(beat, f_beat, beat, f_beat)
        cap_rows, cap_bracket = self.cold_brackets(rows, f0)
        kept = torch.isin(rows, cap_rows)
        return cap_rows, Bracket.new(beat[kept], f_beat[kept], cap_bracket.hi, cap_bracket.f_hi)

    def run(
        self,
        f0: Tensor,
        guess: Tensor | None,
        beat: Tensor | None = None,
        cap_margin: Tensor | None = None,
    ) -> RadiusResult:
        """Bracket every open sample (cold at the cap, warm around its guess, or above the
        radius to beat), then refine.

        Args:
            f0: (B,) margin at ε = 0 less the floor; the open samples are those above 0.
            guess: (B,) warm-start radii (:class:`KnownBatch`), or None.
            beat: (B,) radii to beat (:class:`KnownBatch`), or None.
            cap_margin: (B,) margins at the cap less the floor, NaN where not known, or None.
        """
        open_ = (f0 > 0) & (self.cap > 0)
        warm = torch.zeros_like(open_)
        above = torch.zeros_like(open_)
        if beat is not None:
            beat = beat.to(self.cap)
            above = open_ & torch.isfinite(beat) & (beat > 0) & (beat < self.cap)
        if guess is not None:
            guess = guess.to(self.cap)
            warm = open_ & ~above & torch.isfinite(guess) & (guess > 0) & (guess < self.cap)
        cold = open_ & ~warm & ~above
        known = torch.zeros_like(cold)
        if cap_margin is not None:
            known = cold & torch.isfinite(cap_margin.to(self.cap))
        pieces = []
        rows = torch.nonzero(known, as_tuple=True)[0]
        if rows.numel():
            pieces.append(self.cold_brackets(rows, f0[rows], cap_margin.to(self.cap)[rows]))
        rows = torch.nonzero(cold & ~known, as_tuple=True)[0]
        if rows.numel():
            pieces.append(self.cold_brackets(rows, f0[rows]))
        rows = torch.nonzero(warm, as_tuple=True)[0]
        if rows.numel():
            pieces.append(self.warm_brackets(rows, f0[rows], guess[rows]))
        rows = torch.nonzero(above, as_tuple=True)[0]
        if rows.numel():
            beat_rows, bracket = self.beat_brackets(rows, f0[rows], beat[rows])
            if beat_rows.numel():
                pieces.append((beat_rows, bracket))
        if pieces:
            rows = torch.cat([r for r, _ in pieces])
            strategy = SEARCHES[self.settings.strategy]()
            self.refine(rows, Bracket.cat([b for _, b in pieces]), strategy)
        return RadiusResult(self.radius, self.evaluations, self.converged)

    def refine(self, rows: Tensor, bracket: Bracket, strategy: Strategy) -> None:
        """Shrink every bracket below its tolerance (or stop at max_iter); report ``lo``."""
        for _ in range(self.settings.max_iter):
            tol = self.tol(bracket.lo)
            open_ = bracket.hi - bracket.lo > tol
            if not open_.any():
                break
            self.radius[rows[~open_]] = bracket.lo[~open_]
            rows, bracket, tol = rows[open_], bracket.select(open_), tol[open_]
            point = strategy.propose(bracket, tol).clamp(bracket.lo, bracket.hi)
            f_point = self.margin_at(rows, point)
            bracket.update(point, f_point)
            done = (f_point > 0) & (f_point <= self.settings.ftol)
            self.radius[rows[done]] = point[done]
            rows, bracket = rows[~done], bracket.select(~done)
        else:
            self.converged[rows[bracket.hi - bracket.lo > self.tol(bracket.lo)]] = False
        self.radius[rows] = bracket.lo


def certified_radius(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_max: float | Tensor,
    method: str = "ibp",
    settings: SearchSettings = EVALUATION_SEARCH,
    *,
    known: KnownBatch | None = None,
) -> Tensor:
    """(B,) certified radii; see :func:`radius_search` for the arguments and the cost."""
    return radius_search(model, x, y, eps_max, method, settings, known=known).radius
