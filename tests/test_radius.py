"""The certified radius search (acert.radius): every reported radius is certified, the next
tolerance step is not, caps and misclassified samples are respected, PGD finds nothing inside,
the exact MILP radius is an upper bound, and the two searches agree."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

import acert.radius
from acert.attacks import margin_loss, pgd_attack
from acert.bounds import clean_forward, input_box, margin_bounds, margin_evaluator
from acert.bounds.layers import forward_with_stats
from acert.errors import UnsupportedModelError
from acert.models import Normalize
from acert.radius import (
    SAFETY_MARGIN,
    RadiusResult,
    certified_radius,
    radius_search,
)
from exact import exact_radius

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ("ibp", "crown-ibp", "crown")
SEARCHES = ("brent", "bisection")
EPS_MAX = 0.1
XTOL = 1e-4 * EPS_MAX  # the default


@pytest.fixture(scope="module")
def trained():
    """A tiny MLP trained for 300 full-batch Adam steps on 3 noisy Gaussian blobs in [0, 1]^6,
    and 40 test points (3 labels flipped so that some are surely misclassified)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    centres = 0.2 + 0.6 * torch.rand(3, 6, generator=g)

    def sample(n):
        y = torch.arange(n) % 3
        x = (centres[y] + 0.13 * torch.randn(n, 6, generator=g)).clamp(0, 1)
        return x, y

    x_train, y_train = sample(300)
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5] * 6, [0.3] * 6),
        nn.Linear(6, 12),
        nn.ReLU(),
        nn.Linear(12, 12),
        nn.ReLU(),
        nn.Linear(12, 3),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval()
    x, y = sample(40)
    y[[3, 17, 29]] = (y[[3, 17, 29]] + 1) % 3
    torch.set_num_threads(threads)
    return model, x, y


def _caps():
    """Per-sample caps: mostly EPS_MAX, some tiny (certified at the cap), one zero."""
    caps = torch.full((40,), EPS_MAX)
    caps[[1, 10, 22, 31]] = 2e-3
    caps[7] = 0.0
    return caps


def _certified(model, x, y, eps, method, stats=None):
    return margin_bounds(model, x, y, eps, method, stats=stats).min(1).values > 0


@dataclass
class Recorded:
    """A search's result and every bound evaluation it made: per sample, the eps values and the
    margin lower bounds (min over classes) exactly as the search computed them, less the
    sample's safety floor (``SAFETY_MARGIN`` of its largest logit): > 0 is what the search
    counts as certified, and implies a positive bound."""

    result: RadiusResult
    eps: list[Tensor]
    margin: list[Tensor]


def recorded_search(model, x, y, caps, method, search, **options) -> Recorded:
    calls = []

    def box(x_rows, eps):
        calls.append([x_rows, eps])
        return input_box(x_rows, eps)

    def evaluator(*args, **kwargs):
        evaluate = margin_evaluator(*args, **kwargs)

        def recording(box, y):
            lb = evaluate(box, y)
            calls[-1].append(lb.min(1).values)
            return lb

        return recording

    with (
        mock.patch.object(acert.radius, "input_box", box),
        mock.patch.object(acert.radius, "margin_evaluator", evaluator),
    ):
        result = radius_search(model, x, y, caps, method, search, **options)
    with torch.no_grad():
        logits = clean_forward(model, x, update_running_stats=False)[0]
        if options.get("stats") is not None:
            logits = forward_with_stats(model, x, options["stats"])
    floor = (SAFETY_MARGIN * logits.abs().amax(1)).tolist()
    eps = [[] for _ in range(len(x))]
    margin = [[] for _ in range(len(x))]
    for x_rows, e, m in calls:
        same = (x_rows[:, None] == x[None]).flatten(2).all(2)
        assert (same.sum(1) == 1).all()
        for k, i in enumerate(same.float().argmax(1).tolist()):
            eps[i].append(float(e[k]))
            margin[i].append(float(m[k]) - floor[i])
    return Recorded(
        result, [torch.tensor(e, dtype=x.dtype) for e in eps], [torch.tensor(m) for m in margin]
    )


def assert_certified_by_search(recorded: Recorded, rows: Tensor) -> None:
    """The search evaluated the bound at exactly the reported radius of each selected sample,
    and it certified there (the soundness rule: report the certified end, never a guess)."""
    r = recorded.result.radius
    for i in torch.nonzero(rows)[:, 0].tolist():
        seen = recorded.eps[i] == r[i]
        assert seen.any() and (recorded.margin[i][seen] > 0).all(), i


def assert_uncertified_beyond(recorded: Recorded, rows: Tensor, tol: Tensor) -> None:
    """... and it evaluated a point at most ``tol`` beyond that radius which did not certify."""
    r = recorded.result.radius
    for i in torch.nonzero(rows)[:, 0].tolist():
        beyond = (recorded.eps[i] > r[i]) & (recorded.eps[i] <= r[i] + tol[i] * (1 + 1e-5))
        assert beyond.any() and (recorded.margin[i][beyond] <= 0).any(), i


def assert_nearly_certified(model, x, y, r, method, stats=None) -> None:
    """Recomputed on another float path (the whole batch at once) the bound at the radius still
    certifies: the rounding allowance absorbs the difference of the float paths."""
    lb = margin_bounds(model, x, y, r, method, stats=stats).min(1).values[r > 0]
    assert (lb > 0).all(), lb.min()


_RESULTS: dict = {}


def _search(trained, method, search, **options) -> Recorded:
    key = (method, search, tuple(sorted(options.items())))
    if key not in _RESULTS:
        model, x, y = trained
        _RESULTS[key] = recorded_search(model, x, y, _caps(), method, search, **options)
    return _RESULTS[key]


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("method", METHODS)
def test_radius_is_certified_and_tight(trained, method, search):
    model, x, y = trained
    caps = _caps()
    recorded = _search(trained, method, search)
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
    at_cap = correct & (caps > 0) & _certified(model, x, y, caps, method)
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
    brent = _search(trained, method, "brent").result
    bisection = _search(trained, method, "bisection").result
    # both are certified points within xtol below the first uncertified point (IBP is monotone;
    # for the CROWN variants this held on every sample here)
    assert ((brent.radius - bisection.radius).abs() <= XTOL + 1e-7).all()
    open_ = bisection.evaluations > 1
    assert brent.evaluations[open_].float().mean() < bisection.evaluations[open_].float().mean()
    assert brent.mean_evaluations < bisection.mean_evaluations


@pytest.mark.parametrize("method", METHODS)
def test_pgd_finds_no_counterexample_inside_the_radius(trained, method):
    model, x, y = trained
    r = _search(trained, method, "brent").result.radius
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
    """(g) the exact MILP radius (tests/exact.py) bounds every method's radius from above."""
    model, x, y = trained
    rows = [2, 4, 6, 8]  # full caps
    radii = {m: _search(trained, m, "brent").result.radius for m in METHODS}
    for i in rows:
        exact = exact_radius(model, x[i], int(y[i]), EPS_MAX, tol=1e-5)
        assert exact > 0
        for method in METHODS:
            assert radii[method][i] <= exact + 1e-5, (method, i, exact)
        # CROWN is close to the exact radius on this tiny net, IBP far below it
        assert radii["crown"][i] >= 0.3 * exact


@pytest.mark.parametrize("search", SEARCHES)
def test_iteration_limit_keeps_radii_certified(trained, search):
    """(i) a search cut by max_iter is not converged but still certified, and below the full one."""
    model, x, y = trained
    recorded = recorded_search(model, x, y, _caps(), "ibp", search, max_iter=3)
    cut = recorded.result
    full = _search(trained, "ibp", search).result
    assert (~cut.converged).sum() >= 10
    assert (cut.evaluations <= 4).all()
    assert cut.converged[full.evaluations <= 4].all()
    assert_certified_by_search(recorded, cut.radius > 0)
    assert_nearly_certified(model, x, y, cut.radius, "ibp")
    assert (cut.radius <= full.radius + 1e-7).all()


@pytest.mark.parametrize("search", SEARCHES)
def test_ftol_stop_returns_a_certified_point(trained, search):
    """(j) stopping on a small certified margin (and with rtol) still reports certified points."""
    model, x, y = trained
    ftol, rtol = 0.05, 0.01
    recorded = recorded_search(model, x, y, _caps(), "ibp", search, rtol=rtol, ftol=ftol)
    result = recorded.result
    full = _search(trained, "ibp", search).result
    r = result.radius
    positive = r > 0
    assert_certified_by_search(recorded, positive)
    assert_nearly_certified(model, x, y, r, "ibp")
    assert (r <= full.radius + 1e-7).all()
    assert result.evaluations.sum() < full.evaluations.sum()
    # each open sample stopped on a small certified margin or on its relative tolerance
    open_ = positive & (r < _caps())
    for i in torch.nonzero(open_)[:, 0].tolist():
        at_r = recorded.margin[i][recorded.eps[i] == r[i]]
        beyond = (recorded.eps[i] > r[i]) & (recorded.eps[i] <= r[i] + (XTOL + rtol * r[i]) * 1.001)
        small = (at_r <= ftol).all()
        assert small or (recorded.margin[i][beyond] <= 0).any(), i
    assert any(
        (recorded.margin[i][recorded.eps[i] == r[i]] <= ftol).all()
        for i in torch.nonzero(open_)[:, 0].tolist()
    )  # the ftol rule did stop some samples


def test_certified_radius_is_the_search_radius(trained):
    model, x, y = trained
    torch.testing.assert_close(
        certified_radius(model, x, y, _caps(), "crown-ibp", search="bisection"),
        _search(trained, "crown-ibp", "bisection").result.radius,
    )
    with torch.no_grad():
        logits = model(x)
    given = radius_search(model, x, y, _caps(), "ibp", logits=logits)
    torch.testing.assert_close(given.radius, _search(trained, "ibp", "brent").result.radius)


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


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_radius_is_certified_with_the_given_stats(tiny_net, method):
    """(k) with train-mode batch-norm the search uses the clean-batch statistics it is given
    (here from a larger batch than the one searched), and the running stats stay untouched."""
    model, shape = tiny_net("mlp-bn", seed=3)
    model.train()
    g = torch.Generator().manual_seed(3)
    batch = torch.rand(24, *shape, generator=g)
    logits, stats = clean_forward(model, batch, update_running_stats=False)
    y = logits.argmax(1)
    state = copy.deepcopy(model.state_dict())
    x, y_sub, logits_sub = batch[:12], y[:12], logits[:12]
    for given_logits in (logits_sub, None):
        recorded = recorded_search(
            model, x, y_sub, 0.3, method, "brent", stats=stats, logits=given_logits
        )
        r = recorded.result.radius
        assert (r > 0).all()
        assert_certified_by_search(recorded, r > 0)
        assert_uncertified_beyond(recorded, r < 0.3, torch.full((12,), 3e-5))
        assert_nearly_certified(model, x, y_sub, r, method, stats=stats)
        # and in eval-mode semantics: the net with those statistics frozen in
        frozen = copy.deepcopy(model).eval()
        with torch.no_grad():
            for layer, ref in zip(model, frozen, strict=True):
                if layer in stats:
                    ref.running_mean.copy_(stats[layer][0])
                    ref.running_var.copy_(stats[layer][1])
        assert_nearly_certified(frozen, x, y_sub, r, method)
    # the searched batch's own statistics give other radii; without any, no radius is a
    # certificate of model(x), which then depends on the whole batch: refused
    own_stats = clean_forward(model, x, update_running_stats=False)[1]
    own = radius_search(model, x, y_sub, 0.3, method, stats=own_stats).radius
    assert_nearly_certified(model, x, y_sub, own, method, stats=own_stats)
    assert (own - r).abs().max() > 1e-4
    with pytest.raises(UnsupportedModelError, match=r"model\.eval"):
        radius_search(model, x, y_sub, 0.3, method)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)
    assert model.training


def test_float32_radius_in_float64(trained):
    """(11) the float32 radius also certifies in float64."""
    model, x, y = trained
    model64, x64 = copy.deepcopy(model).double(), x.double()
    for method in METHODS:
        r = _search(trained, method, "brent").result.radius
        positive = r > 0
        lb64 = margin_bounds(model64, x64, y, r.double(), method).min(1).values
        # the rounding allowance keeps every float32 certificate valid in float64
        assert (lb64[positive] > 0).all(), (method, lb64[positive].min())
        # the search in float64 finds about the same radii; float32 gives up only the allowance,
        # which also covers the model's own float32 forward pass relative to the magnitudes of
        # its terms (0.7% of a radius of 0.006 here, for CROWN)
        r64 = radius_search(model64, x64, y, _caps().double(), method).radius
        assert (r.double() <= r64 + XTOL).all()
        assert ((r64 - r.double()).abs() <= 2 * XTOL + 1e-2 * r64).all()


@pytest.mark.parametrize("noise", [0.0, 0.02, 0.3])
@pytest.mark.parametrize("method", METHODS)
def test_warm_started_search_is_certified_and_matches_the_cold_search(trained, method, noise):
    """Issue 4: guesses (here the cold radii, perturbed) change the cost, never the promise."""
    model, x, y = trained
    caps = _caps()
    cold = _search(trained, method, "brent").result
    generator = torch.Generator().manual_seed(3)
    guess = cold.radius * (1 + noise * torch.randn(len(x), generator=generator))
    guess[0] = float("nan")  # unknown
    guess[5] = 2 * EPS_MAX  # above the cap: cold start
    recorded = recorded_search(model, x, y, caps, method, "brent", guess=guess)
    warm = recorded.result
    positive = warm.radius > 0
    assert_certified_by_search(recorded, positive)
    assert torch.equal(warm.radius == 0, cold.radius == 0)
    assert ((warm.radius - cold.radius).abs() <= XTOL * (1 + 1e-5)).all()
    tol = torch.full_like(warm.radius, XTOL)
    assert_uncertified_beyond(recorded, positive & (warm.radius < caps), tol)
    if noise == 0.0:
        open_ = (cold.radius > 0) & (cold.radius < caps)
        assert warm.evaluations[open_].float().mean() < cold.evaluations[open_].float().mean()


def test_radius_memory_guesses_last_uncapped_radii():
    from acert.methods.acert import RadiusMemory

    memory = RadiusMemory()
    idx = torch.tensor([4, 0, 2])
    assert torch.isnan(memory.guess(idx)).all()
    memory.remember(idx, torch.tensor([0.1, 0.3, 0.0]), cap=0.3)
    guess = memory.guess(torch.tensor([0, 2, 4, 7]))
    assert torch.isnan(guess[0])  # capped last time: start at the new cap
    assert guess[1] == 0.0 and guess[2] == pytest.approx(0.1) and torch.isnan(guess[3])
    restored = RadiusMemory()
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.guess(idx).nan_to_num(-1), memory.guess(idx).nan_to_num(-1))
