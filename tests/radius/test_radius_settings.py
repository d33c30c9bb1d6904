"""What a caller hands the radius search (acert.radius): the settings (iteration limit, ftol
and rtol, the warm start's spread; one frozen SearchSettings) and what it already knows of the
batch (KnownBatch: clean logits, batch-norm statistics, warm-start guesses). Each still gives
certified radii; the guarantees of the default search are in tests/radius/test_radius.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from acert.bounds import clean_forward
from acert.foundation.errors import AcertError, UnsupportedModelError
from acert.radius import (
    TRAINING_SEARCH,
    KnownBatch,
    SearchSettings,
    certified_radius,
    radius_search,
)
from tests.kit.radius import (
    EPS_MAX,
    METHODS,
    SEARCHES,
    XTOL,
    assert_certified_by_search,
    assert_nearly_certified,
    assert_uncertified_beyond,
    cold_search,
    default_caps,
    recorded_search,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("search", SEARCHES)
def test_iteration_limit_keeps_radii_certified(trained, search):
    """(i) a search cut by max_iter is not converged but still certified, and below the full one."""
    model, x, y = trained
    settings = SearchSettings(strategy=search, max_iter=3)
    recorded = recorded_search(model, x, y, default_caps(), "ibp", settings)
    cut = recorded.result
    full = cold_search(trained, "ibp", search).result
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
    settings = SearchSettings(strategy=search, rtol=rtol, ftol=ftol)
    recorded = recorded_search(model, x, y, default_caps(), "ibp", settings)
    result = recorded.result
    full = cold_search(trained, "ibp", search).result
    r = result.radius
    positive = r > 0
    assert_certified_by_search(recorded, positive)
    assert_nearly_certified(model, x, y, r, "ibp")
    assert (r <= full.radius + 1e-7).all()
    assert result.evaluations.sum() < full.evaluations.sum()
    # each open sample stopped on a small certified margin or on its relative tolerance
    open_ = positive & (r < default_caps())
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
        certified_radius(model, x, y, default_caps(), "crown-ibp", SearchSettings("bisection")),
        cold_search(trained, "crown-ibp", "bisection").result.radius,
    )
    with torch.no_grad():
        logits = model(x)
    given = radius_search(model, x, y, default_caps(), "ibp", known=KnownBatch(logits=logits))
    torch.testing.assert_close(given.radius, cold_search(trained, "ibp", "brent").result.radius)


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
        known = KnownBatch(logits=given_logits, stats=stats)
        recorded = recorded_search(model, x, y_sub, 0.3, method, known=known)
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
    own = radius_search(model, x, y_sub, 0.3, method, known=KnownBatch(stats=own_stats)).radius
    assert_nearly_certified(model, x, y_sub, own, method, stats=own_stats)
    assert (own - r).abs().max() > 1e-4
    with pytest.raises(UnsupportedModelError, match=r"model\.eval"):
        radius_search(model, x, y_sub, 0.3, method)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)
    assert model.training


@pytest.mark.parametrize("noise", [0.0, 0.02, 0.3])
@pytest.mark.parametrize("method", METHODS)
def test_warm_started_search_is_certified_and_matches_the_cold_search(trained, method, noise):
    """Issue 4: guesses (here the cold radii, perturbed) change the cost, never the promise."""
    model, x, y = trained
    caps = default_caps()
    cold = cold_search(trained, method, "brent").result
    generator = torch.Generator().manual_seed(3)
    guess = cold.radius * (1 + noise * torch.randn(len(x), generator=generator))
    guess[0] = float("nan")  # unknown
    guess[5] = 2 * EPS_MAX  # above the cap: cold start
    recorded = recorded_search(model, x, y, caps, method, known=KnownBatch(guess=guess))
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


def test_a_warm_start_probes_at_the_spread_of_its_settings(trained):
    """The settings' spread places a warm start's second probe; the radii stay the cold ones."""
    model, x, y = trained
    caps = default_caps()
    cold = cold_search(trained, "ibp", "brent").result.radius
    inner = (cold > 0) & (cold < caps)
    guess = torch.where(inner, cold, torch.nan)
    settings = SearchSettings(spread=0.3)
    recorded = recorded_search(model, x, y, caps, "ibp", settings, KnownBatch(guess=guess))
    for i in torch.nonzero(inner)[:, 0].tolist():
        probes = recorded.eps[i][:2]
        beyond = (guess[i] * 1.3).minimum(caps[i])  # certified at the guess: probe above it
        assert probes[0] == guess[i] and probes[1] == beyond, (i, probes)
    assert ((recorded.result.radius - cold).abs() <= XTOL * (1 + 1e-5)).all()


def test_settings_are_one_frozen_object():
    """A shared settings object (the default of every search, ACERT's) cannot be changed in
    place; a variant is a new object, checked again."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        TRAINING_SEARCH.max_iter = 50  # type: ignore[misc]
    assert dataclasses.replace(TRAINING_SEARCH, max_iter=3).max_iter == 3
    assert TRAINING_SEARCH.max_iter == 10
    with pytest.raises(AcertError, match="max_iter must be a whole number >= 0, got -1"):
        dataclasses.replace(TRAINING_SEARCH, max_iter=-1)


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
