"""The certified radius search (acert.radius): every reported radius is certified, the next
tolerance step is not, caps and misclassified samples are respected, PGD finds nothing inside,
the exact MILP radius is an upper bound, and the two searches agree. The settings and what the
caller hands the search are in tests/radius/test_radius_settings.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from acert.bounds import margin_bounds
from acert.radius import radius_search
from acert.radius.attacks import margin_loss, pgd_attack
from tests.kit.exact import exact_radius
from tests.kit.radius import (
    EPS_MAX,
    METHODS,
    SEARCHES,
    XTOL,
    assert_certified_by_search,
    assert_nearly_certified,
    assert_uncertified_beyond,
    certified_at,
    cold_search,
    default_caps,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("method", METHODS)
def test_radius_is_certified_and_tight(trained, method, search):
    model, x, y = trained
    caps = default_caps()
    recorded = cold_search(trained, method, search)
    result = recorded.result
    r = result.radius
    assert r.shape == (40,) and r.dtype == x.dtype
    assert result.converged.all()
    evaluations = torch.tensor([len(e) for e in recorded.eps])
    torch.testing.assert_close(result.evaluations, evaluations)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert 3 <= int((~correct).sum()) < 20  # the data has both kinds
    # (c) misclassified: exactly 0, no bound evaluated
    assert (r[~correct] == 0).all()
    assert (evaluations[~correct] == 0).all()
    # (d) caps respected; certified at the cap -> exactly the cap, after one evaluation
    assert (r >= 0).all() and (r <= caps).all()
    assert r[7] == 0 and evaluations[7] == 0  # cap 0
    at_cap = correct & (caps > 0) & certified_at(model, x, y, caps, method)
    assert at_cap.sum() >= 4
    assert (r[at_cap] == caps[at_cap]).all()
    assert (evaluations[at_cap] == 1).all()
    # (a) the search evaluated the bound at exactly the reported radius and it certified there
    positive = r > 0
    assert positive.sum() >= 25
    assert_certified_by_search(recorded, positive)
    assert_nearly_certified(model, x, y, r, method)
    # (b) ... and it evaluated a point at most one tolerance beyond that did not certify
    inner = correct & (r < caps)
    assert inner.sum() >= 10
    assert_uncertified_beyond(recorded, inner, torch.full((40,), XTOL))
    # the same recomputed on the whole batch (rounding allowed)
    lb_beyond = margin_bounds(model, x, y, torch.minimum(r + XTOL, caps), method).min(1).values
    assert (lb_beyond[inner] < 1e-5).all()
    # (h) bisection spends 1 + ceil(log2(cap / xtol)) evaluations per open sample
    if search == "bisection":
        expected = 1 + math.ceil(math.log2(EPS_MAX / XTOL))
        assert ((evaluations[inner] - expected).abs() <= 1).all(), evaluations[inner]


@pytest.mark.parametrize("method", METHODS)
def test_brent_and_bisection_agree_and_brent_is_cheaper(trained, method):
    brent = cold_search(trained, method, "brent").result
    bisection = cold_search(trained, method, "bisection").result
    # both are certified points within xtol below the first uncertified point (IBP is monotone;
    # for the CROWN variants this held on every sample here)
    assert ((brent.radius - bisection.radius).abs() <= XTOL + 1e-7).all()
    open_ = bisection.evaluations > 1
    assert brent.evaluations[open_].float().mean() < bisection.evaluations[open_].float().mean()
    assert brent.mean_evaluations < bisection.mean_evaluations


@pytest.mark.parametrize("method", METHODS)
def test_pgd_finds_no_counterexample_inside_the_radius(trained, method):
    model, x, y = trained
    r = cold_search(trained, method, "brent").result.radius
    rows = r > 0
    adversarial = pgd_attack(
        model,
        x[rows],
        y[rows],
        r[rows],
        steps=50,
        restarts=3,
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        assert (margin_loss(model(adversarial), y[rows]) < 0).all()
    assert ((adversarial - x[rows]).abs().amax(1) <= r[rows] + 1e-6).all()


def test_radius_below_exact_radius(trained):
    """(g) the exact MILP radius (tests/kit/exact.py) bounds every method's radius from above."""
    model, x, y = trained
    rows = [2, 4, 6, 8]  # full caps
    radii = {m: cold_search(trained, m, "brent").result.radius for m in METHODS}
    for i in rows:
        exact = exact_radius(model, x[i], int(y[i]), EPS_MAX, tol=1e-5)
        assert exact > 0
        for method in METHODS:
            assert radii[method][i] <= exact + 1e-5, (method, i, exact)
        # CROWN is close to the exact radius on this tiny net, IBP far below it
        assert radii["crown"][i] >= 0.3 * exact


def test_degenerate_batches(trained):
    model, x, y = trained
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 3
    result = radius_search(model, x, wrong, EPS_MAX)
    assert (result.radius == 0).all() and (result.evaluations == 0).all()
    # per-sample caps of 0 (a scalar cap of 0 is refused: tests/test_input_errors.py)
    assert (radius_search(model, x, y, torch.zeros(40)).radius == 0).all()
    # a scalar cap equals the same cap per sample
    torch.testing.assert_close(
        radius_search(model, x, y, 0.1).radius,
        radius_search(model, x, y, torch.full((40,), 0.1)).radius,
    )


def test_float32_radius_in_float64(trained):
    """(11) the float32 radius also certifies in float64."""
    model, x, y = trained
    model64, x64 = copy.deepcopy(model).double(), x.double()
    for method in METHODS:
        r = cold_search(trained, method, "brent").result.radius
        positive = r > 0
        lb64 = margin_bounds(model64, x64, y, r.double(), method).min(1).values
        # the rounding allowance keeps every float32 certificate valid in float64
        assert (lb64[positive] > 0).all(), (method, lb64[positive].min())
        # the search in float64 finds about the same radii; float32 gives up only the allowance,
        # which also covers the model's own float32 forward pass relative to the magnitudes of
        # its terms (0.7% of a radius of 0.006 here, for CROWN)
        r64 = radius_search(model64, x64, y, default_caps().double(), method).radius
        assert (r.double() <= r64 + XTOL).all()
        assert ((r64 - r.double()).abs() <= 2 * XTOL + 1e-2 * r64).all()
