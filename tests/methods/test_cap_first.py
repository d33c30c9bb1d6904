"""ACERT's step with the training pass as the check at the cap (acert.methods.cap_first): the
same loss and radii as the step that searches first, within the search's tolerance."""

from __future__ import annotations

import copy

import pytest
import torch

from acert.config import TrainConfig
from acert.foundation.errors import ConfigError
from acert.methods import ACERT, Batch, Step, create_method
from acert.radius import TRAINING_SEARCH
from tests.kit.nets import build_tiny_net


def trained_like_batch(size: int = 48) -> tuple[torch.nn.Module, Batch]:
    model, shape = build_tiny_net("cnn-bn", seed=3)
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(size, *shape, generator=generator)
    with torch.no_grad():
        logits = model.train()(x)  # the batch's own statistics, as the step's clean pass
    y = logits.argmax(1)
    y[:6] = (y[:6] + 1) % logits.shape[1]  # a few misclassified samples: radius 0
    return model.train(), Batch(x, y, torch.arange(size))


def two_steps(model, batch, cap, cap_check, warmup=False):
    """Two ACERT steps on the same batch (the second warm-started from the first's radii)."""
    model = copy.deepcopy(model)
    method = ACERT(kappa=0.3, cap_check=cap_check)
    step = Step(index=50, epoch=3, eps=cap, eps_max=0.4, warmup=warmup)
    out = []
    for _ in range(2):
        terms = method.loss(model, batch, step)
        terms.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad()
        out.append((terms, grads))
    return out


@pytest.mark.parametrize("cap", [0.002, 0.02, 0.2])
@pytest.mark.parametrize("warmup", [False, True])
def test_the_training_pass_first_gives_the_loss_and_radii_of_the_search_first(cap, warmup):
    model, batch = trained_like_batch()
    searched = two_steps(model, batch, cap, "search", warmup)
    checked = two_steps(model, batch, cap, "training-pass", warmup)
    tolerance = TRAINING_SEARCH.xtol + TRAINING_SEARCH.rtol * cap
    for (a, grads_a), (b, grads_b) in zip(searched, checked, strict=True):
        assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
        assert (a.radii - b.radii).abs().max().item() <= tolerance
        assert b.metrics["radius_evals"] == a.metrics["radius_evals"]
        assert b.metrics["certified"] == a.metrics["certified"]
        assert b.metrics["radius"] == pytest.approx(a.metrics["radius"], abs=tolerance)
        assert torch.allclose(grads_a, grads_b, rtol=1e-4, atol=1e-6)
    radii = searched[0][0].radii
    assert (radii[:6] <= (1e-6 if warmup else 0)).all()  # the misclassified ones
    if cap == 0.002:
        assert (radii[6:] == cap).float().mean() > 0.5  # most certified at the cap: few searched
    if cap == 0.2:
        assert (radii[6:] < cap).all()  # none at the cap: every one searched after the pass


def test_the_cap_check_is_a_config_key_with_its_names():
    method = create_method(TrainConfig(method="acert", cap_check="training-pass"))
    assert method.cap_check == "training-pass"
    assert create_method(TrainConfig(method="acert")).cap_check == "search"
    with pytest.raises(ConfigError, match="choose one of search, training-pass"):
        create_method(TrainConfig(method="acert", cap_check="pass-first"))
