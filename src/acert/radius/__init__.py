"""Per-sample certified radius by batched bracketed root finding
(docs/METHOD.md, "Certified radius").

For a correctly classified input the certified margin ``m(ε) = min_t lb_t(x, ε)`` is continuous
and non-increasing, so ``r(x) = sup{ε <= ε_max : m(ε) > 0}`` is found by keeping, per sample,
a bracket ``[lo, hi]`` with ``m(lo) > 0`` (certified) and ``m(hi) <= 0``. A search strategy
proposes the next point inside each open bracket: :class:`Brent` (inverse quadratic
interpolation and secant steps, safeguarded by bisection, Brent 1973) or :class:`Bisection`.
Only the samples still open are evaluated, each stops on its own tolerance, and the radius
reported is always ``lo``: a point where the bound was evaluated and certified, never an
interpolated root that could lie past it.

``radius_search(model, x, y, eps_max, method, settings, known=...)``: the settings
(:class:`SearchSettings`, :data:`EVALUATION_SEARCH` by default, :data:`TRAINING_SEARCH` for
ACERT's training radii) say how the search runs; :class:`KnownBatch` carries what the caller
already has of the batch (clean logits, batch-norm statistics, warm-start guesses).

Modules: :mod:`~acert.radius.search` (the search), :mod:`~acert.radius.strategies` (brackets,
Brent, bisection), :mod:`~acert.radius.settings` (the settings and their checks).
"""

from __future__ import annotations

from acert.radius.known import KnownBatch
from acert.radius.search import (
    SAFETY_MARGIN,
    RadiusResult,
    certified_radius,
    check_cap,
    clean_margins,
    radius_search,
)
from acert.radius.settings import EVALUATION_SEARCH, TRAINING_SEARCH, SearchSettings
from acert.radius.strategies import SEARCHES, Bisection, Bracket, Brent

__all__ = [
    "EVALUATION_SEARCH",
    "SAFETY_MARGIN",
    "SEARCHES",
    "TRAINING_SEARCH",
    "Bisection",
    "Bracket",
    "Brent",
    "KnownBatch",
    "RadiusResult",
    "SearchSettings",
    "certified_radius",
    "check_cap",
    "clean_margins",
    "radius_search",
]
