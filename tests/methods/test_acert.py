"""The ACERT loss against docs/METHOD.md's formula on a linear model whose radii are known by
hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acert.config import TrainConfig
from acert.methods import ACERT, Batch, Step, WarmupRegularizer, create_method
from acert.methods.base import robust_cross_entropy
from acert.models import Normalize
from acert.radius import TRAINING_SEARCH, SearchSettings


def linear_model() -> nn.Sequential:
    """f(x) = (x_0, x_1): margin of class 0 is x_0 - x_1, its weight difference has L1 norm 2."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.bias.zero_()
    return nn.Sequential(Normalize((0.0,), (1.0,)), layer)


def batch() -> Batch:
    # margins 0.2, 0.8, -0.4 for label 0; lb(ε) = margin - 2ε while the box stays inside [0, 1]
    x = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])
    return Batch(x, torch.zeros(3, dtype=torch.long), torch.arange(3))


def step(eps: float, warmup: bool = False) -> Step:
    return Step(index=100, epoch=5, eps=eps, eps_max=0.4, warmup=warmup)


def test_robust_cross_entropy_is_log_one_plus_sum_exp():
    lb = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    expected = torch.tensor(
        [math.log(1 + math.exp(-0.5) + math.exp(1.0)), math.log(1 + math.exp(-2.0) + 1)]
    ).mean()
    assert robust_cross_entropy(lb).item() == pytest.approx(expected.item(), rel=1e-6)


def test_adaptive_radii_are_the_capped_certified_radii():
    method = ACERT(kappa=0.25, regularizer=WarmupRegularizer(0, 0))
    model, b = linear_model(), batch()
    logits = model(b.x)
    radii, evaluations = method.adaptive_radii(model, b, step(0.3), logits, {})
    # sample 0: root 0.1; sample 1: certified at the cap 0.3; sample 2: misclassified -> 0
    assert radii[0].item() == pytest.approx(0.1, abs=1e-4) and radii[0].item() <= 0.1
    assert radii[1].item() == pytest.approx(0.3, rel=1e-6)
    assert radii[2].item() == 0.0
    assert evaluations >= 1


def test_acert_loss_matches_the_formula_by_hand():
    kappa = 0.25
    method = ACERT(kappa=kappa, regularizer=WarmupRegularizer(0, 0))
    model, b = linear_model(), batch()
    terms = method.loss(model, b, step(0.3))
    # lower bounds at the radii: ≈0 at the root, 0.8 - 2·0.3 = 0.2 at the cap, -0.4 at radius 0
    lb = torch.tensor([[0.0], [0.2], [-0.4]])
    loss_rob = torch.log1p(torch.exp(-lb)).mean()
    logits = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])
    loss_std = F.cross_entropy(logits, b.y)
    expected = (1 - kappa) * loss_rob + kappa * loss_std
    assert terms.loss.item() == pytest.approx(expected.item(), abs=2e-4)
    assert terms.metrics["loss_std"] == pytest.approx(loss_std.item(), rel=1e-6)
    assert terms.metrics["radius"] == pytest.approx((0.1 + 0.3 + 0.0) / 3, abs=1e-4)


def test_kappa_one_gives_the_clean_loss_and_eps_zero_is_standard_training():
    model, b = linear_model(), batch()
    clean = F.cross_entropy(model(b.x), b.y).item()
    one = ACERT(kappa=1.0, regularizer=WarmupRegularizer(0, 0)).loss(model, b, step(0.3))
    assert one.loss.item() == pytest.approx(clean, rel=1e-6)
    zero_eps = ACERT(kappa=0.0).loss(model, b, step(0.0, warmup=False))
    assert zero_eps.loss.item() == pytest.approx(clean, rel=1e-6)
    unregularised = ACERT(kappa=0.0, regularizer=WarmupRegularizer(0, 0))
    assert unregularised.loss(model, b, step(0.0, warmup=True)).loss.item() == pytest.approx(
        clean, rel=1e-6
    )


def test_warmup_floor_and_regulariser_weight():
    torch.manual_seed(0)
    model = nn.Sequential(Normalize((0.0,), (1.0,)), nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].bias.fill_(5.0)  # every hidden unit active: the balance term is at its maximum, 2
    b = batch()
    plain = ACERT(kappa=0.0, regularizer=WarmupRegularizer(0, 0))
    regularised = ACERT(kappa=0.0, regularizer=WarmupRegularizer(0.5, 0.5))
    logits = model(b.x)
    radii, _ = plain.adaptive_radii(model, b, step(0.1, warmup=True), logits, {})
    assert torch.all(radii >= 1e-6)  # misclassified samples too get the warm-up floor
    base = plain.loss(model, b, step(0.1, warmup=True))
    with_reg = regularised.loss(model, b, step(0.1, warmup=True))
    reg = with_reg.metrics["loss_reg"]
    assert reg >= 0.5 * 2.0
    # weighted by 1 - ε_s/ε_max = 0.75 during warm-up, absent afterwards
    assert with_reg.loss.item() == pytest.approx(base.loss.item() + 0.75 * reg, rel=1e-5)
    after = regularised.loss(model, b, step(0.1, warmup=False))
    assert "loss_reg" not in after.metrics


def test_loss_has_gradients_through_the_bounds():
    torch.manual_seed(1)
    model = nn.Sequential(
        Normalize((0.1,), (0.3,)),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).train()
    x, y = torch.rand(16, 1, 2, 2), torch.randint(0, 3, (16,))
    terms = ACERT(kappa=0.0).loss(model, Batch(x, y, torch.arange(16)), step(0.05, warmup=True))
    terms.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_training_search_is_method_md_and_the_config_sets_strategy_and_limit():
    """ACERT's radii come from one SearchSettings: docs/METHOD.md's training search by default; the
    config's radius_search, radius_max_iter and radius_rtol change that one object, and the loss
    obeys it."""
    assert (
        ACERT().search
        == TRAINING_SEARCH
        == SearchSettings("brent", xtol=1e-6, rtol=1e-4, ftol=1e-5, max_iter=10, sound=False)
    )
    assert create_method(TrainConfig(method="acert")).search == TRAINING_SEARCH
    config = TrainConfig(
        method="acert",
        radius_search="bisection",
        radius_max_iter=2,
        radius_rtol=1e-2,
        radius_warm_start=False,
    )
    method = create_method(config)
    assert method.search == SearchSettings(
        "bisection", xtol=1e-6, rtol=1e-2, ftol=1e-5, max_iter=2, sound=False
    )
    assert method.memory is None
    # bisection on [0, 0.3] for sample 0 (root 0.1): the cap, then 0.15 and 0.075, then stop
    model, b = linear_model(), batch()
    radii, evaluations = method.adaptive_radii(model, b, step(0.3), model(b.x), {})
    assert radii[0] == torch.tensor(0.075) and radii[1].item() == pytest.approx(0.3, rel=1e-6)
    assert evaluations == pytest.approx((3 + 1 + 0) / 3)
