"""The fixtures every test module may use; the helpers they build on are the test kit,
:mod:`tests.kit`."""

from __future__ import annotations

import pytest
import torch

from tests.kit.nets import build_tiny_net, reference_logits, true_margins


@pytest.fixture
def tiny_net():
    """``tiny_net(name, seed)`` -> (eval-mode model, per-sample input shape)."""
    return build_tiny_net


@pytest.fixture
def margins_at():
    """``margins_at(model, x, y, stats=None)`` -> (B, K-1) true margins."""

    def margins(model, x, y, stats=None):
        return true_margins(reference_logits(model, x, stats), y)

    return margins


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread: the tiny tensors of the bound tests gain nothing from
    more, and on a loaded 2-core machine OpenMP's thread hand-offs make them ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def exact_arithmetic(monkeypatch):
    """Bounds without the rounding allowance, to compare them with values worked out by hand."""
    import acert.bounds.allowances

    monkeypatch.setattr(acert.bounds.allowances, "ROUNDING_ULPS", 0)
