"""The radius-search tests' model, data and recording search (tests/radius/test_radius*.py).

``make_trained()`` builds a tiny trained MLP and 40 test points; ``recorded_search`` runs a
radius search and records every bound evaluation it made, so that a test can check that the
reported radius is a point the search evaluated and certified.
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch
from torch import Tensor, nn

import acert.radius.search
from acert.bounds import clean_forward, input_box, margin_bounds, margin_evaluator
from acert.bounds.clean_pass import forward_with_stats
from acert.models import Normalize
from acert.radius import (
    EVALUATION_SEARCH,
    SAFETY_MARGIN,
    RadiusResult,
    SearchSettings,
    radius_search,
)

METHODS = ("ibp", "crown-ibp", "crown")
SEARCHES = ("brent", "bisection")
EPS_MAX = 0.1
XTOL = 1e-4 * EPS_MAX  # the default


def make_trained() -> tuple[nn.Sequential, Tensor, Tensor]:
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


def default_caps():
    """Per-sample caps: mostly EPS_MAX, some tiny (certified at the cap), one zero."""
    caps = torch.full((40,), EPS_MAX)
    caps[[1, 10, 22, 31]] = 2e-3
    caps[7] = 0.0
    return caps


def certified_at(model, x, y, eps, method, stats=None):
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


def recorded_search(model, x, y, caps, method, settings=EVALUATION_SEARCH, known=None) -> Recorded:
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
        mock.patch.object(acert.radius.search, "input_box", box),
        mock.patch.object(acert.radius.search, "margin_evaluator", evaluator),
    ):
        result = radius_search(model, x, y, caps, method, settings, known=known)
    with torch.no_grad():
        logits = clean_forward(model, x, update_running_stats=False)[0]
        if known is not None and known.stats is not None:
            logits = forward_with_stats(model, x, known.stats)
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


def cold_search(trained, method: str, search: str) -> Recorded:
    """The default search with the given strategy on ``trained`` (the result of
    :func:`make_trained`) at :func:`default_caps`, recorded once per model."""
    model, x, y = trained
    key = (id(model), method, search)
    if key not in _RESULTS:
        settings = SearchSettings(strategy=search)
        _RESULTS[key] = model, recorded_search(model, x, y, default_caps(), method, settings)
    return _RESULTS[key][1]
